"""flipback's minimum-norm (L2) corrective attack.

Phase 1, boundary search in float space (in the spirit of FAB, Croce & Hein 2020): each
step projects both the current point and the original image onto the boundary as
linearized at the current point, and mixes the two, biased toward the current point for
stability; after a success it steps back toward the original. It needs a handful of
gradient queries where DDN or FMN need about a hundred.

Phase 2, onto the 8-bit grid: rounding a float solution almost always undoes it, since
most of its values change by less than half a level. Instead, the smallest-L2 integer
change that reaches the boundary as linearized at the best float point, plus a margin
`b`, is solved exactly (projection.py), and `b` is adapted per image with one query per
try. Images still not corrected finish with the `fast` attack's steps, so every image
ends corrected unless the query budget runs out.
"""

from __future__ import annotations

import torch

from ..targets.whitebox import WhiteBoxTarget, margin
from .base import MIN_MARGIN, AttackResult, CorrectiveAttack, to_grid
from .fast import FastAttack
from .projection import project_to_halfspace


class MinimalAttack(CorrectiveAttack):
    name = "minimal"

    def __init__(self, *, steps: int = 8, grid_steps: int = 6, first_scale: float = 1.5, alpha_max: float = 0.1,
                 overshoot: float = 1.05, backtrack: float = 0.9, max_queries: int = 40,
                 pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        self.steps = steps
        self.grid_steps = grid_steps
        self.first_scale = first_scale
        self.alpha_max = alpha_max
        self.overshoot = overshoot
        self.backtrack = backtrack
        self.max_queries = max_queries

    def run(self, target: WhiteBoxTarget, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        corrected, success, queries, logits = self._start(target, images)
        shape = (-1, *corrected.shape[1:])
        pixels255 = corrected.flatten(1) * 255
        out, grad = target.gradient(corrected, labels, margin, counted=False)

        # Phase 1: float boundary search. `change` is the current point, in 1/255 units.
        change = torch.zeros_like(pixels255)
        best = torch.zeros_like(pixels255)
        best_norm = torch.full((len(images),), float("inf"))
        best_grad = torch.zeros_like(pixels255)
        best_margin = torch.zeros(len(images))
        m, g = margin(out, labels), grad.flatten(1) / 255
        for _ in range(self.steps):
            gap = 2 * MIN_MARGIN - m  # aim just past the margin that counts as corrected
            from_here = project_to_halfspace(g, gap, pixels255 + change, discrete=False)
            from_origin = project_to_halfspace(g, (g * change).sum(1) + gap, pixels255, discrete=False)
            d_here, d_origin = from_here.norm(dim=1), from_origin.norm(dim=1)
            alpha = (d_here / (d_here + d_origin).clamp_min(1e-12)).clamp(max=self.alpha_max)[:, None]
            change = (1 - alpha) * (change + self.overshoot * from_here) + alpha * self.overshoot * from_origin
            change = torch.maximum(torch.minimum(change, 255 - pixels255), -pixels255)
            out, grad = target.gradient((pixels255 + change).view(shape) / 255, labels, margin)
            queries += 1
            m, g = margin(out, labels), grad.flatten(1) / 255
            ok = m > MIN_MARGIN
            norm = change.norm(dim=1)
            better = ok & (norm < best_norm)
            best[better], best_norm[better] = change[better], norm[better]
            best_grad[better], best_margin[better] = g[better], m[better]
            if self.pixels == "float":
                corrected[better] = ((pixels255 + change) / 255)[better].view(shape)
                logits[better], success[better] = out[better], True
            # Step back toward the original after a success, re-linearizing at the new point.
            m = torch.where(ok, m - (1 - self.backtrack) * (g * change).sum(1), m)
            change = torch.where(ok[:, None], change * self.backtrack, change)
        if self.pixels == "float":
            return self._finish(target, images, labels, corrected, success, queries, logits)

        # Phase 2: onto the 8-bit grid, along the best float change (or the last one),
        # scaled by a per-image factor found by geometric bisection, one query per try.
        found = torch.isfinite(best_norm)
        base = torch.where(found[:, None], best, change)
        lo = torch.ones(len(images))  # scale known (or assumed) too small
        hi = torch.full((len(images),), float("inf"))  # smallest scale known to work
        scale = torch.full((len(images),), self.first_scale)
        for _ in range(self.grid_steps):
            step = torch.round(base * scale[:, None])
            step = torch.maximum(torch.minimum(step, 255 - pixels255), -pixels255)
            out = target.predict((pixels255 + step).view(shape) / 255)
            queries += 1
            ok = margin(out, labels) > MIN_MARGIN
            better = ok & (scale < hi)
            corrected[better] = ((pixels255 + step) / 255)[better].view(shape)
            logits[better], success[better] = out[better], True
            hi = torch.where(better, scale, hi)
            lo = torch.where(ok, lo, torch.maximum(lo, scale))
            scale = torch.where(torch.isfinite(hi), torch.sqrt(lo * hi), scale * 2)
        return self._finish(target, images, labels, corrected, success, queries, logits)

    def _finish(self, target, images, labels, corrected, success, queries, logits) -> AttackResult:
        """Images not yet corrected get the query-efficient attack with what budget is left."""
        rest = (~success).nonzero().squeeze(1)
        left = self.max_queries - int(queries.max()) if len(queries) else 0
        if len(rest) and left > 0:
            fallback = FastAttack(max_queries=left, pixels=self.pixels)
            r = fallback.run(target, images[rest], labels[rest])
            corrected[rest], success[rest], logits[rest] = r.corrected, r.success, r.logits
            queries[rest] += r.queries
        return AttackResult(corrected, success, queries, logits)
