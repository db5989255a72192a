"""What a target answers, and the two ways a counted query can fail, shared by every oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FlipbackError

OUTPUTS = ("scores", "label")


@dataclass
class Answer:
    """The target's answer to one call, one row per image."""

    labels: torch.Tensor  # (N,) int64, top-1
    scores: torch.Tensor | None  # (N, K) float32 as returned (probabilities or logits); None when hard-label

    def __len__(self) -> int:
        return len(self.labels)


class TargetError(FlipbackError):
    """One call to the target failed (after its retries): malformed or non-finite answer, server
    error, timeout. Other calls may still work. `answered` (bool, per image of the call) and
    `partial` (labels -1 and NaN scores where not answered) keep what did come back.
    `transient`: the target was unavailable (every attempt failed with a server error, a rate
    limit, a timeout or a broken connection), so the same call may well work later; otherwise
    the answer itself was bad (malformed, NaN), which is a problem of these images."""

    def __init__(self, message: str, hint: str | None = None, *, partial: Answer | None = None,
                 answered: torch.Tensor | None = None, transient: bool = False):
        super().__init__(message, hint)
        self.partial = partial
        self.answered = answered
        self.transient = transient


class BudgetExceeded(FlipbackError):
    """A call would spend more queries than a budget allows. Raised *before* anything is sent.

    kind: "total" or "per_image". ids: for per_image, the ids whose budget is spent (int64);
    `answered`/`partial` as in TargetError when part of the call was already answered (only
    possible when retries used up the budget in the middle of a call)."""

    def __init__(self, message: str, *, kind: str, ids: torch.Tensor | None = None, hint: str | None = None,
                 partial: Answer | None = None, answered: torch.Tensor | None = None):
        super().__init__(message, hint)
        self.kind = kind
        self.ids = ids
        self.partial = partial
        self.answered = answered
