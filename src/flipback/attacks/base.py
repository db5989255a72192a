"""The shared interface of corrective attacks.

A corrective attack gets images the target gets wrong and their true labels, and returns
changed images the target classifies correctly, with a success mask and exact per-image
query counts. Every attack is written once against two parts (see targets/oracle.py and
targets/guide.py):
- an *oracle*, which answers candidates and counts each answer as a query;
- a *guide*, which supplies gradients: the target itself in white-box mode (each of its
  evaluations of a modified image is then a query that also verifies it), a surrogate in
  black-box mode (free, but its opinion verifies nothing).

An attack object holds only its settings. The working state of one call lives in an
`AttackCall`, so one attack object can serve several threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..targets.answers import Answer
from ..targets.guide import Objective
from ..targets.whitebox import MIN_MARGIN

PIXELS = ("uint8", "float")
MODES = ("white-box", "black-box")

__all__ = ["AttackCall", "AttackResult", "Corrected", "CorrectiveAttack", "MIN_MARGIN", "MODES", "PIXELS",
           "Verdict", "to_grid"]


@dataclass
class AttackResult:
    corrected: torch.Tensor  # (N, C, H, W) in [0, 1]; on the 8-bit grid unless pixels == "float"
    success: torch.Tensor  # (N,) bool, verified by the oracle on exactly `corrected`
    queries: torch.Tensor  # (N,) int64, counted per the mission's definition
    logits: torch.Tensor  # (N, K) the oracle's scores on `corrected` (NaN where never asked, or hard-label)
    # (N,) int64: the oracle's top-1 answer on `corrected`; -1 where it was never asked.
    labels: torch.Tensor | None = None
    # Region-level methods: (N, H, W) int, k for the k-th most contributing region, 0 elsewhere.
    regions: torch.Tensor | None = None
    # (N, H, W) float: each pixel's share of the margin the change gained (region methods).
    importance: torch.Tensor | None = None
    # (N, H, W) float: the explanation's ranking of the pixels, higher first (region methods).
    order: torch.Tensor | None = None
    # Per image, how the kept answer changed with the queries spent: [[queries, L2 of the
    # change kept then, or None while it is not a verified correction], ...], one entry per
    # query count at which it changed. It gives the frontier (success and L2 against queries).
    trace: list | None = None
    # Region-level methods, per image: the kind of change that corrected it ("remove": toward a
    # local blur; "free": any change within +-eps), None where it was not corrected.
    change: list | None = None

    def __len__(self) -> int:
        return len(self.success)

    def answered(self) -> torch.Tensor:
        """The oracle's top-1 on `corrected`: the stored labels, else the scores' argmax (-1: none)."""
        if self.labels is not None:
            return self.labels
        scores = self.logits
        return torch.where(torch.isfinite(scores).all(1), torch.nan_to_num(scores).argmax(1), -1)


def to_grid(x: torch.Tensor, pixels: str) -> torch.Tensor:
    """Clip to [0, 1] and, for 8-bit pixels, round to the nearest multiple of 1/255."""
    x = x.clamp(0, 1)
    return torch.round(x * 255) / 255 if pixels == "uint8" else x


def score_margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True score minus the strongest other: > 0 exactly when the true label leads."""
    true = scores.gather(1, labels[:, None]).squeeze(1)
    return true - scores.scatter(1, labels[:, None], float("-inf")).max(1).values


class Corrected:
    """The success criterion (Foolbox's idea of a criterion object, turned around): the oracle's
    top-1 answer is the true label and, where it gives scores, the true label leads by more
    than `min_margin` (white-box: a small logit margin, so the verdict survives re-evaluation
    in another batch)."""

    def __init__(self, min_margin: float = 0.0):
        self.min_margin = float(min_margin)

    def __call__(self, answered: torch.Tensor, scores: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        ok = answered == labels
        if scores is not None:
            finite = torch.isfinite(scores).all(1)  # a NaN answer never counts as correct
            ok = ok & finite & (score_margin(torch.nan_to_num(scores), labels) > self.min_margin)
        return ok


@dataclass
class Verdict:
    """The oracle's answer on candidates of some rows, with what the criterion made of it."""

    ok: torch.Tensor  # bool: asked and corrected
    asked: torch.Tensor  # bool: sent to the oracle (a row without budget left is not)
    labels: torch.Tensor  # int64 top-1, -1 where not asked
    scores: torch.Tensor  # (rows, K) scores, NaN where not asked or hard-label


class AttackCall:
    """The working state of one call of an attack: the images, their budgets and the best
    answers so far. Every counted evaluation goes through here, and a row whose budget is
    spent is never sent: no image can exceed its budget."""

    def __init__(self, oracle, guide, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None, *,
                 pixels: str, budget: int | torch.Tensor | None):
        self.oracle, self.guide = oracle, guide
        self.pixels = pixels
        self.device = dev = guide.device
        n = len(images)
        self.num_classes = oracle.num_classes
        self.x0 = to_grid(images.to(dev), pixels)
        self.labels = labels.to(dev).long()
        self.ids = (torch.arange(n) if ids is None else torch.as_tensor(ids)).long().cpu()
        # The guide is the oracle's own model (white-box): each guide evaluation is a counted
        # query, and its answer is the oracle's verdict.
        self.guide_is_oracle = guide is oracle
        self.criterion = Corrected(oracle.min_margin)
        self.corrected = self.x0.clone()
        self.success = torch.zeros(n, dtype=torch.bool, device=dev)
        self.queries = torch.zeros(n, dtype=torch.long, device=dev)
        self.scores = torch.full((n, self.num_classes), float("nan"), device=dev)
        self.answered = torch.full((n,), -1, dtype=torch.long, device=dev)
        big = 2 ** 62
        if budget is None:
            budget = big
        self.budget = torch.as_tensor(budget, dtype=torch.long).to(dev).expand(n).clone()
        self._oracle_limited = getattr(getattr(oracle, "ledger", None), "per_image_budget", None) is not None or \
            getattr(getattr(oracle, "ledger", None), "budget", None) is not None
        self._events: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, queries, L2) per record

    def __len__(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------ budgets

    def left(self, rows: torch.Tensor) -> torch.Tensor:
        """Queries each row may still spend in this call."""
        left = self.budget[rows] - self.queries[rows]
        if self._oracle_limited:
            left = torch.minimum(left, self.oracle.remaining_for(self.ids[rows.cpu()]).to(self.device))
        return left

    # ------------------------------------------------------------------ counted evaluations

    def _empty(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.full((m,), -1, dtype=torch.long, device=self.device),
                torch.full((m, self.num_classes), float("nan"), device=self.device))

    def _verdict(self, rows, asked, answer: Answer | None) -> Verdict:
        labels, scores = self._empty(len(rows))
        if answer is not None:
            labels[asked] = answer.labels.to(self.device)
            if answer.scores is not None:
                scores[asked] = answer.scores.to(self.device, torch.float32)
        hard = self.oracle.output == "label"
        ok = self.criterion(labels, None if hard else scores, self.labels[rows]) & asked
        return Verdict(ok, asked, labels, scores)

    def check(self, rows: torch.Tensor, x: torch.Tensor) -> Verdict:
        """Ask the oracle about candidates `x` of `rows`: one query per row with budget left."""
        asked = self.left(rows) > 0
        answer = None
        if bool(asked.any()):
            sub = rows[asked]
            answer = self.oracle.ask(x[asked], self.ids[sub.cpu()])
            self.queries[sub] += 1
        return self._verdict(rows, asked, answer)

    def probe(self, rows: torch.Tensor, x: torch.Tensor, objective: Objective):
        """Verify candidates and get the guide's gradient there -> (verdict, guide logits,
        gradient). White-box: one counted forward-backward pass gives both. Black-box: one
        oracle query, and the surrogate's gradient for free. Rows not asked get zero gradients."""
        if not self.guide_is_oracle:
            verdict = self.check(rows, x)
            logits, grad = self.guide.gradients(x, self.labels[rows], objective)
            return verdict, logits, grad
        return self._paid_gradients(rows, x, objective)

    def steer(self, rows: torch.Tensor, x: torch.Tensor, objective: Objective):
        """The guide's gradient at candidates that steer the search -> (verdict or None, guide
        logits, gradient). White-box: a counted query, which also verifies. Black-box: free,
        and verifies nothing (verdict None)."""
        if self.guide_is_oracle:
            return self._paid_gradients(rows, x, objective)
        logits, grad = self.guide.gradients(x, self.labels[rows], objective)
        return None, logits, grad

    def guide_logits(self, rows: torch.Tensor, x: torch.Tensor):
        """The guide's logits at candidates -> (verdict or None, logits); counted (and a verdict)
        only when the guide is the oracle. Rows without budget get NaN logits."""
        if not self.guide_is_oracle:
            return None, self.guide.logits(x)
        asked = self.left(rows) > 0
        _, logits = self._empty(len(rows))
        answer = None
        if bool(asked.any()):
            sub = rows[asked]
            answer = self.oracle.ask(x[asked], self.ids[sub.cpu()])
            self.queries[sub] += 1
            logits[asked] = answer.scores.to(self.device, torch.float32)
        return self._verdict(rows, asked, answer), logits

    def _paid_gradients(self, rows, x, objective):
        asked = self.left(rows) > 0
        _, logits = self._empty(len(rows))
        grad = torch.zeros_like(x)
        answer = None
        if bool(asked.any()):
            sub = rows[asked]
            out, g = self.oracle.gradient(x[asked], self.labels[sub], objective, ids=self.ids[sub.cpu()])
            self.queries[sub] += 1
            logits[asked], grad[asked] = out, g.to(grad.dtype)
            answer = Answer(out.argmax(1), out)
        return self._verdict(rows, asked, answer), logits, grad

    # ------------------------------------------------------------------ free evaluations

    def original_gradient(self, objective: Objective, rows: torch.Tensor | None = None):
        """The guide's logits and gradient on the unmodified images: free in both modes (they
        come with finding the error)."""
        x0 = self.x0 if rows is None else self.x0[rows]
        labels = self.labels if rows is None else self.labels[rows]
        return self.guide.gradients(x0, labels, objective)

    def original_logits(self) -> torch.Tensor:
        return self.guide.logits(self.x0)

    # ------------------------------------------------------------------ results

    def record(self, rows: torch.Tensor, x: torch.Tensor, verdict: Verdict, where: torch.Tensor | None = None) -> None:
        """Keep candidates `x` of `rows` (those in `where`, when given) with their verdict."""
        if where is not None:
            rows, x = rows[where], x[where]
            verdict = Verdict(verdict.ok[where], verdict.asked[where], verdict.labels[where], verdict.scores[where])
        self.corrected[rows] = x
        self.success[rows] = verdict.ok
        self.answered[rows] = verdict.labels
        self.scores[rows] = verdict.scores
        l2 = (x - self.x0[rows]).flatten(1).norm(dim=1)
        self._events.append((rows.cpu(), self.queries[rows].cpu(), torch.where(verdict.ok, l2, torch.nan).cpu()))

    def absorb_trace(self, rows: torch.Tensor, trace: list | None, offset: torch.Tensor) -> None:
        """The trace of a sub-call that continued `rows`, its query counts shifted by the
        queries they had spent before it (`offset`)."""
        flat = [(row, q + off, float("nan") if v is None else v)
                for row, off, events in zip(rows.tolist(), offset.tolist(), trace or []) for q, v in events]
        if flat:
            r, q, v = zip(*flat)
            self._events.append((torch.tensor(r), torch.tensor(q), torch.tensor(v, dtype=torch.float64)))

    def trace(self) -> list[list[list]]:
        """Per image, [[queries, L2 or None], ...]: the kept answer after the last record at
        each query count (see AttackResult.trace)."""
        n = len(self)
        if not self._events:
            return [[] for _ in range(n)]
        rows = torch.cat([e[0] for e in self._events]).numpy()
        queries = torch.cat([e[1] for e in self._events]).numpy()
        l2 = torch.cat([e[2] for e in self._events]).double().numpy()
        order = np.argsort(rows, kind="stable")  # by image, in the order recorded
        rows, queries, l2 = rows[order], queries[order], l2[order]
        last = np.ones(len(rows), bool)  # the last record of each (image, query count)
        last[:-1] = (rows[1:] != rows[:-1]) | (queries[1:] != queries[:-1])
        rows, queries, l2 = rows[last], queries[last], l2[last]
        cuts = np.searchsorted(rows, np.arange(1, n))
        return [[[int(q), None if np.isnan(v) else round(float(v), 6)] for q, v in zip(qs, vs)]
                for qs, vs in zip(np.split(queries, cuts), np.split(l2, cuts))]

    def result(self, **extras) -> AttackResult:
        return AttackResult(self.corrected, self.success, self.queries, self.scores, labels=self.answered,
                            trace=self.trace(), **extras)


class CorrectiveAttack:
    """Base class: subclasses set `name` and implement `run`. `max_queries` is the per-image
    budget of one call; `--budget` sets it."""

    name: ClassVar[str] = ""
    modes: ClassVar[tuple[str, ...]] = MODES
    max_queries: int | None = None
    #: Image-sized float32 tensors the method keeps per image (state, bounds, gradients, blurs),
    #: for the memory planner (runs/memory.py). A new method without its own figure is planned
    #: as the largest of the built-in ones.
    state_copies: ClassVar[int] = 52

    def __init__(self, *, pixels: str = "uint8"):
        if pixels not in PIXELS:
            raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
        self.pixels = pixels

    def budget_for(self, *, guide_free: bool, shape: tuple[int, int] | None = None) -> int | None:
        """The per-image budget of a call, with a free guide (a surrogate) or a paid one, on
        images of `shape` (H, W) where the method's default depends on it."""
        return self.max_queries

    @classmethod
    def state_bytes(cls, shape_chw: tuple[int, int, int], options: dict | None = None) -> int:
        """Bytes of attack state per image of `shape_chw` (C, H, W), made with these keyword
        `options`: what the memory planner budgets for it beside the model."""
        c, h, w = shape_chw
        return cls.state_copies * c * h * w * 4

    def run(self, oracle, guide, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None, *,
            budget: torch.Tensor | None = None) -> AttackResult:
        """Correct `images` (N,C,H,W in [0,1]) toward `labels`. `ids` name the images in the
        oracle's ledger (default 0..N-1); `budget` (per image) defaults to `max_queries`."""
        raise NotImplementedError

    def __call__(self, oracle, guide, images, labels, ids=None, **kw) -> AttackResult:
        return self.run(oracle, guide, images, labels, ids, **kw)

    def start(self, oracle, guide, images, labels, ids, budget) -> AttackCall:
        return AttackCall(oracle, guide, images, labels, ids, pixels=self.pixels,
                          budget=self.budget_for(guide_free=guide.free, shape=tuple(images.shape[-2:]))
                          if budget is None else budget)
