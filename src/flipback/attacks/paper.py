"""The published method 1 (Haffar et al., MDAI 2021): iterative signed-gradient steps
toward the true label, querying after each step and stopping at the first correct answer.

The paper does not give its step size. The default, one 8-bit level (1/255) per step,
keeps every candidate on the 8-bit grid without rounding and was the best of the step
sizes we swept on CIFAR-10 (docs/benchmarks.md). The objective is the cross-entropy of
the true label, as in FGSM-style attacks.
"""

from __future__ import annotations

import torch

from ..targets.whitebox import WhiteBoxTarget, neg_cross_entropy
from .base import AttackResult, CorrectiveAttack, is_corrected, to_grid


class PaperAttack(CorrectiveAttack):
    name = "paper"

    def __init__(self, *, step: float = 1 / 255, max_steps: int = 20, pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        self.step = step
        self.max_steps = max_steps

    def run(self, target: WhiteBoxTarget, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        corrected, success, queries, logits = self._start(target, images)
        # The gradient on the unmodified image comes with finding the error: not counted.
        _, grad = target.gradient(corrected, labels, neg_cross_entropy, counted=False)
        active = torch.arange(len(images))
        for _ in range(self.max_steps):
            if len(active) == 0:
                break
            x = to_grid(corrected[active] + self.step * grad.sign(), self.pixels)
            out, grad_new = target.gradient(x, labels[active], neg_cross_entropy)
            queries[active] += 1
            corrected[active] = x
            logits[active] = out
            ok = is_corrected(out, labels[active])
            success[active] = ok
            active, grad = active[~ok], grad_new[~ok]
        return AttackResult(corrected, success, queries, logits)
