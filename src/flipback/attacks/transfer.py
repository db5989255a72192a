"""Corrective attacks on black-box targets, guided by a surrogate's gradients.

The surrogate is ours, so evaluating it costs no target query; only candidates sent to
the target are counted (by the target's accounting layer). A candidate counts as
corrected when the target's top-1 answer is the true label.
"""

from __future__ import annotations

import torch

from ..targets.surrogate import as_probabilities
from ..targets.whitebox import WhiteBoxTarget, margin, neg_cross_entropy, smooth_margin
from .base import AttackResult, CorrectiveAttack, to_grid
from .projection import project_to_halfspace
from .regions import RegionsAttack


def _log_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Targets return probabilities or logits (or nothing: NaN); in log-probabilities, margins
    are logit differences either way. Without scores, the margin reads as 0."""
    if torch.isnan(scores).all():
        return torch.zeros_like(scores)
    return torch.log(as_probabilities(scores).clamp_min(1e-12))


class TransferAttack(CorrectiveAttack):
    """Base class: holds the surrogate; `run(target, images, labels, ids)` with a black-box target."""

    def __init__(self, surrogate: torch.nn.Module, num_classes: int, *, pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        self.surrogate = WhiteBoxTarget(surrogate, num_classes)

    def _ask(self, target, x: torch.Tensor, ids: torch.Tensor):
        answer = target.query(x, ids)
        scores = answer.scores if answer.scores is not None else torch.full((len(x), target.num_classes), float("nan"))
        return answer.labels, scores.float()


class PaperTransferAttack(TransferAttack):
    """The published method 2: signed-gradient steps of the surrogate toward the true label,
    one target query per candidate, stopping at the first correct answer."""

    name = "paper"

    def __init__(self, surrogate, num_classes, *, step: float = 1 / 255, max_steps: int = 20,
                 pixels: str = "uint8"):
        super().__init__(surrogate, num_classes, pixels=pixels)
        self.step, self.max_steps = step, max_steps

    def run(self, target, images, labels, ids=None) -> AttackResult:
        ids = torch.arange(len(images)) if ids is None else ids
        corrected, success, queries, logits = self._start(target, images)
        active = torch.arange(len(images))
        for _ in range(self.max_steps):
            if len(active) == 0:
                break
            _, grad = self.surrogate.gradient(corrected[active], labels[active], neg_cross_entropy, counted=False)
            x = to_grid(corrected[active] + self.step * grad.sign(), self.pixels)
            answered, scores = self._ask(target, x, ids[active])
            queries[active] += 1
            corrected[active], logits[active] = x, scores
            ok = answered == labels[active]
            success[active] = ok
            active = active[~ok]
        return AttackResult(corrected, success, queries, logits)


class FastTransferAttack(TransferAttack):
    """flipback's black-box method: spend surrogate work, which is free, to save target queries.

    Steps on the surrogate continue until the surrogate's margin for the true label reaches
    a wanted value; only then is the target asked. The steps are the smallest-L2 8-bit
    changes to the wanted margin as linearized (with 20% overshoot) for the first
    `l2_rounds` queries, and signed 1/255 steps after that, which do not stall where the
    L2 step is blocked by the pixel range. The first wanted margin is
    `confidence` logits above the surrogate's margin on the original (where the surrogate
    already agrees with the truth, it is wrong about this image, and only a stronger push
    helps). When the target disagrees, the wanted margin at least doubles, stays
    `confidence` above where the surrogate now is, and, with scores, also grows by how far
    the target's answer still is from the true label. Surrogate steps cost no target query.

    `confidence` trades queries for the size of the change: on the CIFAR-10 benchmark with
    the default ensemble surrogate, 4 logits corrected 99.95% at 1.15 queries with a median L2
    of 0.65, where 8 corrected 99.53% at 1.06 with 1.29 (docs/benchmarks.md)."""

    name = "fast"

    def __init__(self, surrogate, num_classes, *, confidence: float = 4.0, step: float = 1 / 255,
                 inner_steps: int = 64, max_queries: int = 10, direction: str = "auto", l2_rounds: int = 3,
                 pixels: str = "uint8"):
        super().__init__(surrogate, num_classes, pixels=pixels)
        self.confidence, self.step = confidence, step
        self.inner_steps, self.max_queries = inner_steps, max_queries
        self.direction, self.l2_rounds = direction, l2_rounds

    def _surrogate_margin(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin(self.surrogate.predict(x, counted=False), labels)

    def _strengthen(self, x: torch.Tensor, labels: torch.Tensor, want: torch.Tensor, direction: str):
        """Surrogate steps until its margin reaches `want` per image (batched early stop).
        Returns the candidates and the surrogate's margin on them."""
        x = x.clone()
        reached = torch.empty(len(x))
        active = torch.arange(len(x))
        for i in range(self.inner_steps + 1):
            # The margin's gradient, unlike cross-entropy's, does not vanish once the surrogate is confident.
            out, grad = self.surrogate.gradient(x[active], labels[active], margin, counted=False)
            m = margin(out, labels[active])
            reached[active] = m
            short = m < want[active]
            active, grad = active[short], grad[short]
            if len(active) == 0 or i == self.inner_steps:
                break
            if direction == "sign":
                x[active] = to_grid(x[active] + self.step * grad.sign(), self.pixels)
            else:  # the smallest-L2 change to the wanted margin, as linearized, with 20% overshoot
                shape = x[active].shape
                pixels255 = x[active].flatten(1) * 255
                need = 1.2 * (want[active] - m[short])
                change = project_to_halfspace(grad.flatten(1) / 255, need, pixels255,
                                              discrete=self.pixels == "uint8")
                x[active] = to_grid(((pixels255 + change) / 255).view(shape), self.pixels)
        return x, reached

    def run(self, target, images, labels, ids=None) -> AttackResult:
        ids = torch.arange(len(images)) if ids is None else ids
        corrected, success, queries, logits = self._start(target, images)
        start = self._surrogate_margin(corrected, labels)
        want = start.clamp_min(0) + self.confidence
        active = torch.arange(len(images))
        for round_ in range(self.max_queries):
            if len(active) == 0:
                break
            direction = self.direction
            if direction == "auto":  # small L2 changes first; signed steps where those stall
                direction = "l2" if round_ < self.l2_rounds else "sign"
            x, reached = self._strengthen(corrected[active], labels[active], want[active], direction)
            answered, scores = self._ask(target, x, ids[active])
            queries[active] += 1
            corrected[active], logits[active] = x, scores
            ok = answered == labels[active]
            success[active] = ok
            gap = (-margin(_log_probabilities(scores), labels[active])).clamp_min(0)
            want[active] = torch.maximum(2 * want[active], reached + self.confidence) + gap
            active = active[~ok]
        return AttackResult(corrected, success, queries, logits)
class RegionsTransferAttack(RegionsAttack):
    """The `regions` method on a black-box target: the surrogate's gradients choose the regions
    and the steps, for free; the target is asked only once the surrogate's margin reaches a
    wanted value (`confidence` above its margin on the original), which doubles after each
    refusal, or, where the bounded change stalls below that, before the next region joins if
    the surrogate is then right and more so than at the last refusal. The regions' effects are
    measured on the surrogate; every candidate of the bisections (fewest regions, fewest
    pixels) and of pruning and shrinking is asked of the target."""

    def __init__(self, surrogate, num_classes, *, confidence: float = 4.0, max_queries: int = 40,
                 pixel_steps: int = 6, max_steps: int = 64, **options):
        super().__init__(max_queries=max_queries, pixel_steps=pixel_steps, **options)
        self.surrogate = WhiteBoxTarget(surrogate, num_classes)
        self.confidence, self.max_steps = confidence, max_steps

    def _ask(self, target, x, rows):
        return TransferAttack._ask(self, target, x, self._ids[rows])

    def _start_gradient(self, target, x, labels):
        out, g = self.surrogate.gradient(x, labels, smooth_margin, counted=False)
        self._want = margin(out, labels).clamp_min(0) + self.confidence
        self._refused = torch.zeros(len(x))  # the surrogate's margin at the last refusal
        self._since = torch.zeros(len(x), dtype=torch.long)
        return g

    def _iterations(self) -> int:
        return self.max_steps

    def _margins(self, target, x, labels, counted: bool = True):
        return margin(self.surrogate.predict(x, counted=False), labels)

    def _counts_guidance(self) -> bool:
        return False

    def _probe(self, target, x, labels, rows):
        out, g = self.surrogate.gradient(x, labels, smooth_margin, counted=False)
        m = margin(out, labels)
        self._since[rows] += 1
        stalled = (self._since[rows] % self.steps_per_region == 0) & (m > self._refused[rows] + 1)
        ask = ((m >= self._want[rows]) | stalled) & (self._queries[rows] < self.max_queries - self._reserve())
        ok = torch.zeros(len(x), dtype=torch.bool)
        scores = torch.full((len(x), self.surrogate.num_classes), float("nan"))
        if bool(ask.any()):
            answered, scores[ask] = self._ask(target, x[ask], rows[ask])
            ok[ask] = answered == labels[ask]
            refused = rows[ask][~ok[ask]]
            self._want[refused] = torch.maximum(2 * self._want[refused], m[ask][~ok[ask]] + self.confidence)
            self._refused[refused] = m[ask][~ok[ask]]
        return ok, scores, g, ask

    def _check(self, target, x, labels, rows):
        answered, scores = self._ask(target, x, rows)
        return answered == labels, scores


BLACK_BOX_ATTACKS = {a.name: a for a in (PaperTransferAttack, FastTransferAttack, RegionsTransferAttack)}
