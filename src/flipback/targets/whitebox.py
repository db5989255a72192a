"""A white-box target: a PyTorch model with gradients, and exact query accounting.

Query definition (docs/mission): one forward (+ backward) pass on one *modified* image is
one query; a batch of k images is k queries. Evaluations of the unmodified image are not
counted: its answer and gradient come with finding the error.

`WhiteBoxTarget` is both the oracle (it answers candidates, counted per image id in a
`QueryLedger`) and the guide (its own gradients steer the attack; `free` is False because
each of its evaluations of a modified image is a query that also verifies that image).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .answers import Answer
from .guide import ModelGuide, Objective, margin, neg_cross_entropy, smooth_margin
from .ledger import QueryLedger, as_id_list

# A corrected image must clear the boundary by this much (in logits), so that it stays
# corrected when evaluated again in another batch, where float rounding can differ slightly.
MIN_MARGIN = 1e-4

__all__ = ["MIN_MARGIN", "WhiteBoxTarget", "margin", "neg_cross_entropy", "smooth_margin"]


class WhiteBoxTarget(ModelGuide):
    """Wraps a model that takes [0,1] NCHW pixels. `queries` counts every counted image."""

    free = False
    output = "scores"
    min_margin = MIN_MARGIN

    def __init__(self, module: nn.Module, num_classes: int, device: str | torch.device = "cpu", *,
                 budget: int | None = None, per_image_budget: int | None = None):
        super().__init__(module, num_classes, device)
        self.ledger = QueryLedger(budget=budget, per_image_budget=per_image_budget)

    @property
    def queries(self) -> int:
        return self.ledger.queries

    def _count(self, ids, n: int, counted: bool) -> None:
        ids_l = None if ids is None else as_id_list(ids, n)
        if counted:
            self.ledger.check(ids_l, n)
        self.ledger.charge(ids_l, n, counted)

    # ------------------------------------------------------------------ oracle

    def ask(self, x: torch.Tensor, ids) -> Answer:
        """Counted answers on candidates, one query per image, charged to `ids`."""
        logits = self.predict(x, ids=ids)
        return Answer(logits.argmax(1), logits)

    def answer(self, x: torch.Tensor) -> Answer:
        """Free answers on unmodified images."""
        logits = self.predict(x, counted=False)
        return Answer(logits.argmax(1), logits)

    def spent(self, ids) -> torch.Tensor:
        return self.ledger.spent(ids)

    def remaining_for(self, ids) -> torch.Tensor:
        return self.ledger.remaining(ids)

    def add_spent(self, ids, counts) -> None:
        self.ledger.add_spent(ids, counts)

    def stats(self) -> dict:
        return {"queries": self.ledger.queries, "uncounted": self.ledger.uncounted}

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ model access, counted

    def predict(self, x: torch.Tensor, *, counted: bool = True, ids=None) -> torch.Tensor:
        self._count(ids, len(x), counted)
        return self.logits(x)

    def gradient(self, x: torch.Tensor, labels: torch.Tensor, objective: Objective = margin, *,
                 counted: bool = True, need_grad: torch.Tensor | None = None, ids=None):
        """Logits and d objective / d x per image: one counted query per image (also for those
        masked out by `need_grad`, whose gradient is not wanted)."""
        self._count(ids, len(x), counted)
        return self.gradients(x, labels, objective, need_grad)
