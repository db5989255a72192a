"""flipback's query-efficient corrective attack: spend what is free to save queries.

Each round moves the image with the guide, then asks the oracle once.
- When the guide is the target itself (white-box), the gradient of the margin on the
  unmodified image comes free with finding the error, and every later one is a query. One
  linear step to a point past the linearized boundary (the smallest-L2 8-bit change that
  reaches `overshoot` times the missing margin) is corrected on the first query for almost
  every image. Where it is not, a DeepFool-style step from the failed candidate,
  re-linearized there at no extra cost (the verifying query returns the gradient), follows,
  with the overshoot doubling each time.
- When the guide is a surrogate (black-box), its steps are free: the smallest-L2 changes to
  a wanted surrogate margin as linearized (20% overshoot) for the first `l2_rounds` rounds,
  signed 1/255 steps after that, which do not stall where the L2 step is blocked by the
  pixel range, until the surrogate's margin reaches a wanted value; only then is the oracle
  asked. The first wanted margin is `confidence` logits above the surrogate's margin on the
  original (where the surrogate already agrees with the truth, it is wrong about this image,
  and only a stronger push helps). When the oracle disagrees, the wanted margin at least
  doubles, stays `confidence` above where the surrogate now is, and, with scores, also
  grows by how far the oracle's answer still is from the true label.

`confidence` trades queries for the size of the change: on the CIFAR-10 benchmark with the
default ensemble surrogate, 4 logits corrected 99.95% at 1.15 queries with a median L2 of
0.65, where 8 corrected 99.53% at 1.06 with 1.29 (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from ..targets.guide import margin, smooth_margin
from ..targets.surrogate import as_probabilities
from .base import AttackCall, AttackResult, CorrectiveAttack, score_margin, to_grid
from .projection import project_to_halfspace


def log_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Oracles return probabilities or logits (or nothing: NaN); in log-probabilities, margins
    are logit differences either way. Without scores, the margin reads as 0."""
    out = torch.zeros_like(scores)
    given = torch.isfinite(scores).all(1)
    if bool(given.any()):
        out[given] = torch.log(as_probabilities(scores[given]).clamp_min(1e-12))
    return out


class FastAttack(CorrectiveAttack):
    name = "fast"
    state_copies = 16

    def __init__(self, *, overshoot: float = 3.0, confidence: float = 4.0, step: float = 1 / 255,
                 inner_steps: int = 64, l2_rounds: int = 3, direction: str = "auto", max_queries: int = 20,
                 stall: float = 0.25, patience: int = 2, pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        self.overshoot = overshoot
        self.confidence, self.step, self.inner_steps = confidence, step, inner_steps
        self.l2_rounds, self.direction = l2_rounds, direction
        # Free guide: an image stops after `patience` rounds in which its surrogate margin rose
        # by no more than `stall` logits (it would only ask about much the same image again).
        self.stall, self.patience = stall, patience
        self.max_queries = max_queries

    def run(self, oracle, guide, images, labels, ids=None, *, budget=None) -> AttackResult:
        call = self.start(oracle, guide, images, labels, ids, budget)
        self.correct(call, torch.arange(len(call), device=call.device))
        return call.result()

    def correct(self, call: AttackCall, rows: torch.Tensor) -> None:
        """Correct the unmodified images of `rows` in an open call (other methods start from this)."""
        n = len(call)
        shape = call.x0.shape
        pixels255 = call.x0.flatten(1) * 255
        change = torch.zeros_like(pixels255)  # in 1/255 units (paid guide)
        logits, grad = call.original_gradient(smooth_margin, rows)
        gap = -smooth_margin(logits, call.labels[rows])  # > 0 where the guide gets the image wrong
        grad = grad.flatten(1) / 255
        scale = torch.full((n,), self.overshoot, device=call.device)
        # Free guide: the surrogate margin to reach before asking.
        want = torch.zeros(n, device=call.device)
        if call.guide.free:
            want[rows] = margin(call.guide.logits(call.x0[rows]), call.labels[rows]).clamp_min(0) + self.confidence
        best = torch.full((n,), float("-inf"), device=call.device)  # the surrogate margin reached so far
        stalled = torch.zeros(n, dtype=torch.long, device=call.device)
        active = rows
        for round_ in range(self.max_queries):
            has_budget = call.left(active) > 0
            active, grad, gap = active[has_budget], grad[has_budget], gap[has_budget]
            if len(active) == 0:
                break
            if call.guide.free:
                x, reached = self._strengthen(call, active, call.corrected[active], want[active], round_)
                verdict = call.check(active, x)
                call.record(active, x, verdict)
                oracle_gap = (-score_margin(log_probabilities(verdict.scores), call.labels[active])).clamp_min(0)
                want[active] = torch.maximum(2 * want[active], reached + self.confidence) + oracle_gap
                # An image whose surrogate margin stopped rising is saturated: further rounds
                # would ask the target about much the same image, at 64 free steps each.
                grew = reached > best[active] + self.stall
                best[active] = torch.maximum(best[active], reached)
                stalled[active] = torch.where(grew, 0, stalled[active] + 1)
                given_up = stalled[active] >= self.patience
            else:
                step = project_to_halfspace(grad, scale[active] * gap.clamp_min(1e-6),
                                            pixels255[active] + change[active], discrete=self.pixels == "uint8")
                change[active] += step
                x = to_grid(((pixels255[active] + change[active]) / 255).view(-1, *shape[1:]), self.pixels)
                verdict, out, grad_new = call.probe(active, x, smooth_margin)
                call.record(active, x, verdict)
                grad, gap = grad_new.flatten(1) / 255, -smooth_margin(out, call.labels[active])
                scale[active] *= 2
                given_up = torch.zeros_like(verdict.ok)
            keep = ~verdict.ok & ~given_up
            active, grad, gap = active[keep], grad[keep], gap[keep]

    def _strengthen(self, call: AttackCall, rows, x, want, round_: int):
        """Free guide steps until its margin reaches `want` per image (batched early stop).
        Returns the candidates and the guide's margin on them."""
        direction = self.direction
        if direction == "auto":  # small L2 changes first; signed steps where those stall
            direction = "l2" if round_ < self.l2_rounds else "sign"
        x = x.clone()
        labels = call.labels[rows]
        reached = torch.empty(len(x), device=x.device)
        active = torch.arange(len(x), device=x.device)
        for i in range(self.inner_steps + 1):
            # The margin's gradient, unlike cross-entropy's, does not vanish once the guide is confident.
            out, grad = call.guide.gradients(x[active], labels[active], margin)
            m = margin(out, labels[active])
            reached[active] = m
            short = m < want[active]
            active, grad = active[short], grad[short]
            if len(active) == 0 or i == self.inner_steps:
                break
            if direction == "sign":
                x[active] = to_grid(x[active] + self.step * grad.sign(), self.pixels)
            else:  # the smallest-L2 change to the wanted margin, as linearized, with 20% overshoot
                sub = x[active]
                pixels255 = sub.flatten(1) * 255
                need = 1.2 * (want[active] - m[short])
                change = project_to_halfspace(grad.flatten(1) / 255, need, pixels255, discrete=self.pixels == "uint8")
                x[active] = to_grid(((pixels255 + change) / 255).view(sub.shape), self.pixels)
        return x, reached
