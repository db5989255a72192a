"""The Oracle protocol: the one interface through which every attack gets answers.

An oracle answers candidate images with the target's top-1 labels and, unless it is
hard-label, its scores. Every answer on a modified image is a counted query, charged to the
image's id in the oracle's `QueryLedger`, which enforces per-image and total budgets. Answers
on unmodified images are free (`answer`). Implemented by `WhiteBoxTarget` (a local model) and
by `BlackBoxTarget` (a callable, an ONNX file, a model server), so an attack written against
it runs in both modes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .answers import Answer


@runtime_checkable
class Oracle(Protocol):
    num_classes: int
    output: str  # "scores" or "label"
    device: torch.device  # where its answers live; candidates may be sent from any device
    min_margin: float  # a scored answer is correct when the true label leads by more than this

    def ask(self, x: torch.Tensor, ids) -> Answer:
        """Counted: one query per image, charged to `ids`; BudgetExceeded before sending."""

    def answer(self, x: torch.Tensor) -> Answer:
        """Free: the unmodified images."""

    def spent(self, ids) -> torch.Tensor:
        """Counted queries so far per id."""

    def remaining_for(self, ids) -> torch.Tensor:
        """Queries each id may still spend under the oracle's budgets."""

    def add_spent(self, ids, counts) -> None:
        """Charge queries an earlier, interrupted session spent."""

    def stats(self) -> dict: ...

    def close(self) -> None: ...
