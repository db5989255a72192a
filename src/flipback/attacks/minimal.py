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

With `grid="steps"`, phase 2 builds the 8-bit change from unit steps instead: the gradient
at the best float point gives each value's margin per level, and one more level of a value
already moved by l costs 2l + 1 of squared norm, so the steps are taken in order of margin
per unit of squared norm (a greedy knapsack); a bisection on how many steps are taken, one
query per try, finds the fewest that correct. `grid="both"` spends half the tries on each and
keeps the smaller correction. (benchmarks/discrete_grid.py measures them.)

Phase 2b, on the grid (`descent_steps`, 10 by default, white-box): DDN's quantized steps
(Rony et al. 2019), started at the verified 8-bit correction rather than at the original:
each step is one query that verifies the current 8-bit point and gives the gradient there.
On 400 train-split errors of the CIFAR-10 ResNet-20 it took the median L2 from 0.0296 to
0.0285 for 10 more queries (benchmarks/discrete_grid.py; 20 steps: 0.0283; 60 or 100: 0.0280).

Phase 3, pruning: the gradient at the corrected 8-bit point ranks its unit steps by the
margin each buys per unit of squared norm; the worst are taken back while the
linearized margin stays above a fraction of the current one, verified by a query.

Images still not corrected finish with the `fast` attack's steps, so every image ends
corrected unless the query budget runs out; no phase spends past an image's budget.

An image leaves phase 1 once it is corrected and its best norm has not shrunk by
`tolerance` for `patience` steps. On CIFAR-10 that makes about 25 queries per image: about
6 gradient steps, 6 scale tries, 10 quantized steps, 1 gradient and 2 pruning tries.

Black-box, the guide is a surrogate, and two strategies are offered (`black_box`):
- "shrink" (the default): correct with the `fast` attack's transfer steps (about one
  query), then shrink the verified change toward the original with the rest of the budget
  (attacks/shrink.py: a line search; then, with scores, steps along the target's gradient as
  estimated from its answers, with labels only, rotations toward the surrogate's normal;
  each try a target query), and prune. The default budget is 20 queries per image.
- "boundary": phases 1-3 above with the surrogate's boundary standing in for the target's
  (phase 1 free, every try of phases 2 and 3 a target query). With `--pixels float` the best
  float point is verified by one target query.
"""

from __future__ import annotations

import math

import torch

from ..targets.guide import margin
from .base import MIN_MARGIN, AttackCall, AttackResult, CorrectiveAttack
from .fast import FastAttack
from .projection import project_to_halfspace
from .shrink import estimate, shrink

BLACK_BOX = ("shrink", "boundary")
GRIDS = ("scale", "steps", "both")
STEP_VALUES = 8192  # the unit-step grid considers at most this many values per image (largest gradients)
STEP_LEVELS = 64  # and at most this many levels per value
#: The unit-step ranking keeps, per (value, level) pair: its ratio, its int64 order, cumulative
#: gains, masks. Measured (16 images at 224 px, a float change 86 levels deep, so the full 64
#: levels): 307 MiB above scale-then-round's peak, 37 bytes per pair.
UNIT_STEP_BYTES = 40
#: Labels only: the rotations turn to the surrogate's normal toward its next strongest rival class
#: after two refusals, among this many. Chosen on validation errors (docs/benchmarks.md, "The
#: minimal-change frontier"): 3 against 1, 0.7% smaller at 20 queries, 8% at 100 (test split,
#: measured once after: 0.6% and 4.2%).
RIVALS = 3


class MinimalAttack(CorrectiveAttack):
    name = "minimal"
    state_copies = 52  # black-box with scores also keeps its last 24 asked changes (shrink.py)

    def __init__(self, *, steps: int = 8, grid_steps: int = 6, first_scale: float = 1.5,
                 prune_steps: int = 2, prune_keep: float = 0.3, tolerance: float = 0.01, patience: int = 2,
                 alpha_max: float = 0.1, overshoot: float = 1.05, backtrack: float = 0.9,
                 max_queries: int | None = None, black_box: str = "shrink", line_steps: int = 4,
                 rotate: float = 0.5, rivals: int = RIVALS, probes: int = 2, confidence: float = 4.0, grid: str = "scale",
                 descent_steps: int = 10, descent_gamma: float = 0.1, descent_alpha: float = 3.0,
                 pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        if black_box not in BLACK_BOX:
            raise ValueError(f"black_box must be one of {BLACK_BOX}, got {black_box!r}")
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
        self.grid = grid
        self.descent_steps, self.descent_gamma, self.descent_alpha = descent_steps, descent_gamma, descent_alpha
        self.black_box, self.line_steps, self.rotate, self.confidence = black_box, line_steps, rotate, confidence
        self.probes = probes  # scores: probes per round of the target's gradient estimate (0: as with labels)
        self.rivals = rivals  # labels only: the rotations take the normals toward this many rivals in turn
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

    @classmethod
    def state_bytes(cls, shape_chw, options: dict | None = None) -> int:
        """The image copies, and with grid="steps" or "both" the ranking of up to STEP_VALUES
        values' STEP_LEVELS unit steps each."""
        c, h, w = shape_chw
        extra = 0
        if (options or {}).get("grid", "scale") != "scale":
            extra = min(STEP_VALUES, c * h * w) * STEP_LEVELS * UNIT_STEP_BYTES
        return super().state_bytes(shape_chw, options) + extra

    def budget_for(self, *, guide_free: bool, shape: tuple[int, int] | None = None) -> int:
        if self.max_queries is not None:
            return self.max_queries
        return 20 if guide_free and self.black_box == "shrink" else 40

    def run(self, oracle, guide, images, labels, ids=None, *, budget=None) -> AttackResult:
        call = self.start(oracle, guide, images, labels, ids, budget)
        if guide.free and self.black_box == "shrink":
            return self._transfer_and_shrink(call)
        n, dev = len(call), call.device
        shape = (-1, *call.x0.shape[1:])
        pixels255 = call.x0.flatten(1) * 255
        out, grad = call.original_gradient(margin)

        # Phase 1: float boundary search. `change` is the current point, in 1/255 units. An
        # image leaves once it is corrected (in the guide's view) and its best norm has
        # stopped shrinking.
        change = torch.zeros_like(pixels255)
        best = torch.zeros_like(pixels255)
        best_norm = torch.full((n,), float("inf"), device=dev)
        best_g = torch.zeros_like(pixels255)  # the margin's gradient (per level) at the best point
        best_m = torch.zeros(n, device=dev)  # and the margin there
        stalled = torch.zeros(n, dtype=torch.long, device=dev)
        m, g = margin(out, call.labels), grad.flatten(1) / 255
        act = torch.arange(n, device=dev)
        for _ in range(self.steps):
            if call.guide_is_oracle:  # each step is a query
                has_budget = call.left(act) > 0
                act, m, g = act[has_budget], m[has_budget], g[has_budget]
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
            x = ((p + c) / 255).view(shape)
            verdict, out, grad = call.steer(act, x, margin)
            m, g = margin(out, call.labels[act]), grad.flatten(1) / 255
            ok = m > MIN_MARGIN
            norm = c.norm(dim=1)
            better = ok & (norm < best_norm[act])
            improved = better & (norm < (1 - self.tolerance) * best_norm[act])
            best[act[better]], best_norm[act[better]] = c[better], norm[better]
            best_g[act[better]], best_m[act[better]] = g[better], m[better]
            stalled[act] = torch.where(improved, 0, stalled[act] + 1)
            if self.pixels == "float" and verdict is not None:
                call.record(act, x, verdict, where=better & verdict.ok)
            # Step back toward the original after a success, re-linearizing at the new point.
            m = torch.where(ok, m - (1 - self.backtrack) * (g * c).sum(1), m)
            change[act] = torch.where(ok[:, None], c * self.backtrack, c)
            keep = ~(torch.isfinite(best_norm[act]) & (stalled[act] >= self.patience))
            act, m, g = act[keep], m[keep], g[keep]
        found = torch.isfinite(best_norm)
        if self.pixels == "float":
            if not call.guide_is_oracle:  # the surrogate's boundary point, verified by one query
                rows = found.nonzero().squeeze(1)
                x = ((pixels255[rows] + best[rows]) / 255).view(shape)
                verdict = call.check(rows, x)
                call.record(rows, x, verdict, where=verdict.ok)
            return self._finish(call)

        # Phase 2: onto the 8-bit grid, along the best float change (or the last one),
        # scaled by a per-image factor found by geometric bisection, one query per try;
        # or built from unit steps (see the module docstring), or both.
        base = torch.where(found[:, None], best, change)
        tries = {"scale": self.grid_steps, "steps": 0, "both": (self.grid_steps + 1) // 2}[self.grid]
        if self.grid != "scale":
            self._unit_steps(call, pixels255, shape, best, best_g, best_m, found, self.grid_steps - tries)
        lo = torch.ones(n, device=dev)  # scale known (or assumed) too small
        hi = torch.full((n,), float("inf"), device=dev)  # smallest scale known to work
        scale = torch.full((n,), self.first_scale, device=dev)
        everyone = torch.arange(n, device=dev)
        kept = torch.where(call.success, (call.corrected.flatten(1) * 255 - pixels255).round().norm(dim=1),
                           torch.full((n,), float("inf"), device=dev))
        for _ in range(tries):
            step = torch.round(base * scale[:, None])
            step = torch.maximum(torch.minimum(step, 255 - pixels255), -pixels255)
            x = ((pixels255 + step) / 255).view(shape)
            verdict = call.check(everyone, x)
            ok = verdict.ok
            better = ok & (scale < hi)
            norm = step.norm(dim=1)
            call.record(everyone, x, verdict, where=better & (norm <= kept))  # never undo a smaller one
            kept = torch.where(better & (norm <= kept), norm, kept)
            hi = torch.where(better, scale, hi)
            lo = torch.where(ok | ~verdict.asked, lo, torch.maximum(lo, scale))
            scale = torch.where(torch.isfinite(hi), torch.sqrt(lo * hi), scale * 2)

        if self.descent_steps and call.guide_is_oracle and bool(call.success.any()):
            self._grid_descent(call, pixels255, shape)

        # Phase 3: prune the 8-bit change. The gradient at the corrected point says which
        # unit steps buy least margin per unit of norm; drop those while the linearized
        # margin stays above a fraction of the current one.
        if self.prune_steps and bool(call.success.any()):
            self._prune(call, pixels255, shape)
        return self._finish(call)

    def _unit_steps(self, call: AttackCall, pixels255, shape, best, best_g, best_m, found, tries: int) -> None:
        """Phase 2 from unit steps: the steps in order of margin per unit of squared norm
        (linearized at the best float point), and a bisection on how many are taken."""
        rows = found.nonzero().squeeze(1)
        if len(rows) == 0 or tries <= 0:
            return
        g, p = best_g[rows], pixels255[rows]
        k = min(STEP_VALUES, g.shape[1])
        gain, at = g.abs().topk(k, dim=1)  # margin per level of the values that matter most
        up = torch.gather(g, 1, at) > 0
        room = torch.where(up, 255 - p.gather(1, at), p.gather(1, at))  # levels each value may move
        # Levels per value: as many as the float change moves any value, and one more.
        deepest = int(best[rows].abs().max().ceil()) + 1 if len(rows) else 1
        levels = torch.arange(min(STEP_LEVELS, max(4, deepest)), device=g.device)
        # Step l of a value (l = 0, 1, ...) buys `gain` for 2l + 1 of squared norm.
        ratio = gain[:, :, None] / (2 * levels + 1)
        usable = levels < room[:, :, None]
        ratio = torch.where(usable, ratio, torch.zeros_like(ratio)).flatten(1)
        order = torch.argsort(ratio, dim=1, descending=True, stable=True)
        bought = torch.where(usable, gain[:, :, None].expand_as(ratio.view(len(rows), k, -1)),
                             torch.zeros_like(ratio.view(len(rows), k, -1))).flatten(1).gather(1, order).cumsum(1)
        # The linearized margin at x0 + d is m_b + g . (d - c_b): the steps must buy this much.
        need = 2 * MIN_MARGIN - best_m[rows] + (g * best[rows]).sum(1)
        first = (torch.searchsorted(bought, need[:, None].contiguous()).squeeze(1) + 1).clamp(max=bought.shape[1])
        lo = torch.zeros(len(rows), device=g.device)  # step counts known too few
        hi = torch.full((len(rows),), float("inf"), device=g.device)  # fewest known to work
        count = (first.float() * self.first_scale).ceil().clamp(max=bought.shape[1])
        sign = torch.where(up, 1.0, -1.0)
        n_total = ratio.shape[1]
        for _ in range(tries):
            live = ~(torch.isfinite(hi) & (hi - lo <= 1))  # the fewest steps are known: nothing to ask
            if not bool(live.any()):
                break
            r, c = rows[live], count[live]
            taken = (torch.arange(n_total, device=g.device)[None] < c[:, None]).float()
            per_step = torch.zeros_like(taken).scatter_(1, order[live], taken)  # back to (value, level) order
            step = torch.zeros_like(p[live]).scatter_(1, at[live], per_step.view(len(r), k, -1).sum(2) * sign[live])
            x = ((p[live] + step) / 255).view(shape)
            verdict = call.check(r, x)
            ok = verdict.ok
            norm = step.norm(dim=1)
            kept = torch.where(call.success[r], (call.corrected[r].flatten(1) * 255 - p[live]).round().norm(dim=1),
                               torch.full_like(norm, float("inf")))
            call.record(r, x, verdict, where=ok & (norm < kept))
            hi[live] = torch.where(ok, torch.minimum(hi[live], c), hi[live])
            lo[live] = torch.where(verdict.asked & ~ok, torch.maximum(lo[live], c), lo[live])
            count = torch.where(torch.isfinite(hi), ((lo + hi) / 2).ceil(), (count * 2).clamp(max=n_total))

    def _grid_descent(self, call: AttackCall, pixels255, shape) -> None:
        """Phase 2b (`descent_steps`, white-box): DDN's quantized steps (Rony et al. 2019), started
        at the verified 8-bit correction instead of at the original. Each step is one query at
        the current 8-bit point, which verifies it and gives the margin's gradient there; the
        radius shrinks by `descent_gamma` after a success and grows after a failure; the change
        turns toward the gradient (by `descent_alpha` times the radius, annealed), is scaled to
        the radius and rounded to whole levels. The smallest verified point is kept."""
        idx = call.success.nonzero().squeeze(1)
        p = pixels255[idx]
        d = torch.round(call.corrected[idx].flatten(1) * 255) - p
        best_norm = d.norm(dim=1)
        radius = best_norm * (1 - self.descent_gamma)
        k_max = self.descent_steps
        for k in range(k_max):
            d = d * (radius / d.norm(dim=1).clamp_min(1e-12))[:, None]
            d = torch.maximum(torch.minimum(torch.round(d), 255 - p), -p)
            x = ((p + d) / 255).view(shape)
            verdict, out, grad = call.steer(idx, x, margin)
            if not bool(verdict.asked.any()):
                break
            ok = verdict.ok
            norm = d.norm(dim=1)
            better = ok & (norm < best_norm)
            call.record(idx, x, verdict, where=better)
            best_norm = torch.where(better, norm, best_norm)
            radius = torch.where(ok, norm * (1 - self.descent_gamma), radius * (1 + self.descent_gamma))
            g = grad.flatten(1)
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            alpha = self.descent_alpha * (0.1 + 0.45 * (1 + math.cos(math.pi * k / k_max)))
            d = d + (alpha * radius)[:, None] * g

    def _transfer_and_shrink(self, call: AttackCall) -> AttackResult:
        """Black-box: a transfer correction at about one query, then every query left on
        making it smaller."""
        FastAttack(confidence=self.confidence, pixels=self.pixels).correct(call, torch.arange(len(call), device=call.device))
        self.refine(call)
        return call.result()

    def refine(self, call: AttackCall) -> None:
        """Shrink the verified corrections of an open call with the queries each image has
        left: the line search first (it gains most per query), then the steps along the
        boundary, keeping `prune_steps` queries for the pruning that ends it."""
        prune = self.prune_steps if self.pixels == "uint8" else 0
        fixed = call.success.nonzero().squeeze(1)
        if call.oracle.output == "scores" and self.probes:
            estimate(call, fixed, line_steps=self.line_steps, probes=self.probes, keep=prune)
        else:
            shrink(call, fixed, line_steps=self.line_steps, rotate=self.rotate, rivals=self.rivals, keep=prune)
        if prune and bool(call.success.any()):
            self._prune(call, call.x0.flatten(1) * 255, (-1, *call.x0.shape[1:]))

    def _prune(self, call: AttackCall, pixels255, shape) -> None:
        idx = call.success.nonzero().squeeze(1)
        step = torch.round(call.corrected[idx].flatten(1) * 255) - pixels255[idx]
        _, out, grad = call.steer(idx, call.corrected[idx], margin)
        m = margin(out, call.labels[idx])
        usable = torch.isfinite(m) & (m > 0)  # not asked (no budget), or a guide that disagrees
        idx, step, grad, m = idx[usable], step[usable], grad[usable], m[usable]
        unit = torch.sign(step)
        loss = (grad.flatten(1) / 255) * unit  # margin lost by taking back one unit step
        saving = (2 * step.abs() - 1).clamp_min(1)
        ratio = torch.where(step != 0, loss / saving, torch.full_like(loss, float("inf")))
        order = ratio.argsort(1)
        cum_loss = torch.where(step != 0, loss, torch.zeros_like(loss)).gather(1, order).cumsum(1)
        keep_fraction = torch.full((len(idx),), self.prune_keep, device=step.device)
        best_norm = step.norm(dim=1)
        for _ in range(self.prune_steps):
            allowed = (1 - keep_fraction) * m
            drop_sorted = (cum_loss <= allowed[:, None]) & torch.isfinite(ratio.gather(1, order))
            drop = torch.zeros_like(step).scatter(1, order, drop_sorted.to(step.dtype))
            new = step - drop * unit
            x = ((pixels255[idx] + new) / 255).view(shape)
            verdict = call.check(idx, x)
            ok = verdict.ok
            norm = new.norm(dim=1)
            better = ok & (norm < best_norm)
            best_norm = torch.where(better, norm, best_norm)
            call.record(idx, x, verdict, where=better)
            keep_fraction = torch.where(ok, keep_fraction * 0.5, (1 + keep_fraction) / 2)

    def _finish(self, call: AttackCall) -> AttackResult:
        """Images not yet corrected get the query-efficient attack with what budget each has left."""
        rest = (~call.success).nonzero().squeeze(1)
        if len(rest):
            left = call.left(rest)
            rest, left = rest[left > 0], left[left > 0]
        if len(rest):
            fallback = FastAttack(max_queries=int(left.max()), pixels=self.pixels)
            r = fallback.run(call.oracle, call.guide, call.x0[rest], call.labels[rest], call.ids[rest.cpu()],
                             budget=left)
            call.corrected[rest], call.success[rest], call.scores[rest] = r.corrected, r.success, r.logits
            call.answered[rest] = r.labels
            call.absorb_trace(rest, r.trace, call.queries[rest])
            call.queries[rest] += r.queries
        return call.result()
