"""flipback's minimum-norm (L2) corrective attack.

Phase 1, boundary search in float space (in the spirit of FAB, Croce & Hein 2020): each
step projects both the current point and the original image onto the boundary as
linearized at the current point, and mixes the two, biased toward the current point for
stability; after a success it steps back toward the original. It needs a handful of
gradient queries where DDN or FMN need about a hundred.

Phase 2, onto the 8-bit grid: rounding a float solution almost always undoes it, since
most of its values change by less than half a level. The best float change is scaled by
a per-image factor, then rounded; the factor comes from a geometric bisection with one
query per try. (Projecting onto the boundary linearized at the float point, on the grid,
was tried too: it needs a larger margin to succeed and ends with larger changes.)

Phase 3, pruning: the gradient at the corrected 8-bit point ranks its unit steps by the
margin each buys per unit of squared norm; the worst are taken back while the
linearized margin stays above a fraction of the current one, verified by a query.

Images still not corrected finish with the `fast` attack's steps, so every image ends
corrected unless the query budget runs out. An image leaves phase 1 once it is corrected
and its best norm has not shrunk by `tolerance` for `patience` steps. On CIFAR-10 that
makes about 15 queries per image: about 6 gradient steps, 6 scale tries, 1 gradient and
2 pruning tries.
"""

from __future__ import annotations

import torch

from ..targets.whitebox import WhiteBoxTarget, margin
from .base import MIN_MARGIN, AttackResult, CorrectiveAttack
from .fast import FastAttack
from .projection import project_to_halfspace


class MinimalAttack(CorrectiveAttack):
    name = "minimal"

    def __init__(self, *, steps: int = 8, grid_steps: int = 6, first_scale: float = 1.5,
                 prune_steps: int = 2, prune_keep: float = 0.3, tolerance: float = 0.01, patience: int = 2, alpha_max: float = 0.1,
                 overshoot: float = 1.05, backtrack: float = 0.9, max_queries: int = 40,
                 pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        self.steps = steps
        self.grid_steps = grid_steps
        self.first_scale = first_scale
        self.prune_steps = prune_steps
        self.prune_keep = prune_keep
        self.tolerance, self.patience = tolerance, patience
        self.alpha_max = alpha_max
        self.overshoot = overshoot
        self.backtrack = backtrack
        self.max_queries = max_queries

    def run(self, target: WhiteBoxTarget, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        corrected, success, queries, logits = self._start(target, images)
        shape = (-1, *corrected.shape[1:])
        pixels255 = corrected.flatten(1) * 255
        out, grad = target.gradient(corrected, labels, margin, counted=False)

        # Phase 1: float boundary search. `change` is the current point, in 1/255 units. An
        # image leaves once it is corrected and its best norm has stopped shrinking.
        change = torch.zeros_like(pixels255)
        best = torch.zeros_like(pixels255)
        best_norm = torch.full((len(images),), float("inf"))
        stalled = torch.zeros(len(images), dtype=torch.long)
        m, g = margin(out, labels), grad.flatten(1) / 255
        act = torch.arange(len(images))
        for _ in range(self.steps):
            if len(act) == 0:
                break
            c, p = change[act], pixels255[act]
            gap = 2 * MIN_MARGIN - m  # aim just past the margin that counts as corrected
            from_here = project_to_halfspace(g, gap, p + c, discrete=False)
            from_origin = project_to_halfspace(g, (g * c).sum(1) + gap, p, discrete=False)
            d_here, d_origin = from_here.norm(dim=1), from_origin.norm(dim=1)
            alpha = (d_here / (d_here + d_origin).clamp_min(1e-12)).clamp(max=self.alpha_max)[:, None]
            c = (1 - alpha) * (c + self.overshoot * from_here) + alpha * self.overshoot * from_origin
            c = torch.maximum(torch.minimum(c, 255 - p), -p)
            out, grad = target.gradient(((p + c) / 255).view(shape), labels[act], margin)
            queries[act] += 1
            m, g = margin(out, labels[act]), grad.flatten(1) / 255
            ok = m > MIN_MARGIN
            norm = c.norm(dim=1)
            better = ok & (norm < best_norm[act])
            improved = better & (norm < (1 - self.tolerance) * best_norm[act])
            best[act[better]], best_norm[act[better]] = c[better], norm[better]
            stalled[act] = torch.where(improved, 0, stalled[act] + 1)
            if self.pixels == "float":
                corrected[act[better]] = ((p + c) / 255)[better].view(shape)
                logits[act[better]], success[act[better]] = out[better], True
            # Step back toward the original after a success, re-linearizing at the new point.
            m = torch.where(ok, m - (1 - self.backtrack) * (g * c).sum(1), m)
            change[act] = torch.where(ok[:, None], c * self.backtrack, c)
            keep = ~(torch.isfinite(best_norm[act]) & (stalled[act] >= self.patience))
            act, m, g = act[keep], m[keep], g[keep]
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

        # Phase 3: prune the 8-bit change. The gradient at the corrected point says which
        # unit steps buy least margin per unit of norm; drop those while the linearized
        # margin stays above a fraction of the current one.
        if self.prune_steps and bool(success.any()):
            self._prune(target, labels, pixels255, corrected, success, queries, logits, shape)
        return self._finish(target, images, labels, corrected, success, queries, logits)

    def _prune(self, target, labels, pixels255, corrected, success, queries, logits, shape) -> None:
        idx = success.nonzero().squeeze(1)
        step = torch.round(corrected[idx].flatten(1) * 255) - pixels255[idx]
        out, grad = target.gradient(corrected[idx], labels[idx], margin)
        queries[idx] += 1
        m = margin(out, labels[idx])
        unit = torch.sign(step)
        loss = (grad.flatten(1) / 255) * unit  # margin lost by taking back one unit step
        saving = (2 * step.abs() - 1).clamp_min(1)
        ratio = torch.where(step != 0, loss / saving, torch.full_like(loss, float("inf")))
        order = ratio.argsort(1)
        cum_loss = torch.where(step != 0, loss, torch.zeros_like(loss)).gather(1, order).cumsum(1)
        keep_fraction = torch.full((len(idx),), self.prune_keep)
        best_norm = step.norm(dim=1)
        for _ in range(self.prune_steps):
            allowed = (1 - keep_fraction) * m
            drop_sorted = (cum_loss <= allowed[:, None]) & torch.isfinite(ratio.gather(1, order))
            drop = torch.zeros_like(step).scatter(1, order, drop_sorted.to(step.dtype))
            new = step - drop * unit
            x = ((pixels255[idx] + new) / 255).view(shape)
            out = target.predict(x)
            queries[idx] += 1
            ok = margin(out, labels[idx]) > MIN_MARGIN
            norm = new.norm(dim=1)
            better = ok & (norm < best_norm)
            best_norm = torch.where(better, norm, best_norm)
            corrected[idx[better]] = x[better]
            logits[idx[better]] = out[better]
            keep_fraction = torch.where(ok, keep_fraction * 0.5, (1 + keep_fraction) / 2)

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
