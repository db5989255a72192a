"""QueryLedger: exact query counts per image id, and the budgets that bound them.

Every oracle, white-box or black-box, keeps one. Budgets are checked before anything is sent
(`check`), and counts are recorded as soon as the target may have evaluated an image (`charge`).
A lock makes one ledger safe to share between threads.
"""

from __future__ import annotations

import threading

import torch

from .answers import BudgetExceeded

NO_LIMIT = 2 ** 62


def as_id_list(ids, n: int | None = None) -> list[int]:
    t = torch.as_tensor(ids).reshape(-1)
    if t.is_floating_point() or t.is_complex():
        raise ValueError("ids must be integers")
    if n is not None and len(t) != n:
        raise ValueError(f"{len(t)} ids for {n} images")
    return [int(v) for v in t.tolist()]


class QueryLedger:
    """Counted queries in total and per id, under an optional total and per-id budget."""

    def __init__(self, *, budget: int | None = None, per_image_budget: int | None = None):
        for name, value in (("budget", budget), ("per_image_budget", per_image_budget)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        self.budget = budget
        self.per_image_budget = per_image_budget
        self.queries = 0  # counted, total
        self.uncounted = 0  # evaluations of unmodified images and probes
        self._per_id: dict[int, int] = {}
        self._lock = threading.Lock()

    def spent(self, ids) -> torch.Tensor:
        """Counted queries so far for each id (int64, same order)."""
        with self._lock:
            return torch.tensor([self._per_id.get(i, 0) for i in as_id_list(ids)], dtype=torch.int64)

    def remaining(self, ids) -> torch.Tensor:
        """Queries each id may still spend, per-id and total budgets together (NO_LIMIT: none)."""
        with self._lock:
            total_left = NO_LIMIT if self.budget is None else self.budget - self.queries
            out = []
            for i in as_id_list(ids):
                left = NO_LIMIT if self.per_image_budget is None else self.per_image_budget - self._per_id.get(i, 0)
                out.append(max(0, min(left, total_left)))
            return torch.tensor(out, dtype=torch.int64)

    def check(self, ids: list[int] | None, n: int) -> None:
        """Raise BudgetExceeded, before sending, if n more queries for `ids` would break a budget."""
        with self._lock:
            if self.budget is not None and self.queries + n > self.budget:
                raise BudgetExceeded(f"the query budget of {self.budget} is spent ({self.queries} used, {n} more "
                                     "asked)", kind="total", hint="raise --budget")
            if self.per_image_budget is not None and ids is not None:
                need: dict[int, int] = {}
                for i in ids:
                    need[i] = need.get(i, 0) + 1
                over = [i for i, c in need.items() if self._per_id.get(i, 0) + c > self.per_image_budget]
                if over:
                    raise BudgetExceeded(f"the per-image query budget of {self.per_image_budget} is spent for "
                                         f"{len(over)} image(s)", kind="per_image",
                                         ids=torch.tensor(over, dtype=torch.int64))

    def charge(self, ids: list[int] | None, n: int, counted: bool = True) -> None:
        with self._lock:
            if not counted:
                self.uncounted += n
                return
            self.queries += n
            for i in ids or ():
                self._per_id[i] = self._per_id.get(i, 0) + 1

    def add_spent(self, ids, counts) -> None:
        """Record queries spent earlier (a resumed run), so budgets and counts include them."""
        ids_l = as_id_list(ids)
        counts_l = [int(c) for c in torch.as_tensor(counts).reshape(-1).tolist()]
        if len(counts_l) != len(ids_l):
            raise ValueError("one count per id")
        with self._lock:
            for i, c in zip(ids_l, counts_l):
                self._per_id[i] = self._per_id.get(i, 0) + c
                self.queries += c
