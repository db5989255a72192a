"""flipback's query-efficient corrective attack.

The gradient of the margin on the unmodified image comes free with finding the error.
One linear step to a point past the linearized boundary (the smallest-L2 8-bit change
that reaches `overshoot` times the missing margin) is corrected on the first query for
almost every image. Where it is not, a DeepFool-style step from the failed candidate,
re-linearized there, follows, with the overshoot doubling each time.
"""

from __future__ import annotations

import torch

from ..targets.whitebox import WhiteBoxTarget, smooth_margin
from .base import AttackResult, CorrectiveAttack, is_corrected, to_grid
from .projection import project_to_halfspace


class FastAttack(CorrectiveAttack):
    name = "fast"

    def __init__(self, *, overshoot: float = 3.0, max_queries: int = 20, pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        self.overshoot = overshoot
        self.max_queries = max_queries

    def run(self, target: WhiteBoxTarget, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        corrected, success, queries, logits = self._start(target, images)
        shape = corrected.shape
        out, grad = target.gradient(corrected, labels, smooth_margin, counted=False)
        pixels255 = corrected.flatten(1) * 255
        change = torch.zeros_like(pixels255)  # in 1/255 units
        gap = -smooth_margin(out, labels)  # > 0 for a misclassified image
        grad = grad.flatten(1) / 255
        scale = torch.full((len(images),), self.overshoot)
        active = torch.arange(len(images))
        discrete = self.pixels == "uint8"
        for _ in range(self.max_queries):
            if len(active) == 0:
                break
            step = project_to_halfspace(grad, scale * gap.clamp_min(1e-6),
                                        pixels255[active] + change[active], discrete=discrete)
            change[active] += step
            x = to_grid(((pixels255[active] + change[active]) / 255).view(-1, *shape[1:]), self.pixels)
            out, grad_new = target.gradient(x, labels[active], smooth_margin)
            queries[active] += 1
            corrected[active], logits[active] = x, out
            ok = is_corrected(out, labels[active])
            success[active] = ok
            keep = ~ok
            active, grad = active[keep], grad_new[keep].flatten(1) / 255
            gap, scale = -smooth_margin(out[keep], labels[active]), scale[keep] * 2
        return AttackResult(corrected, success, queries, logits)
