"""The shared interface of corrective attacks.

A corrective attack gets images the target gets wrong and their true labels, and returns
changed images the target classifies correctly, with a success mask and exact per-image
query counts. Everything is batched; images leave the working set as soon as they are done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..targets.whitebox import WhiteBoxTarget, margin

PIXELS = ("uint8", "float")
# A corrected image must clear the boundary by this much (in logits), so that it stays
# corrected when evaluated again in another batch, where float rounding can differ slightly.
MIN_MARGIN = 1e-4


@dataclass
class AttackResult:
    corrected: torch.Tensor  # (N, C, H, W) in [0, 1]; on the 8-bit grid unless pixels == "float"
    success: torch.Tensor  # (N,) bool, verified by the target on exactly `corrected`
    queries: torch.Tensor  # (N,) int64, counted per the mission's definition
    logits: torch.Tensor  # (N, K) the target's answer on `corrected` (NaN where never queried)
    # Region-level methods: (N, H, W) int, k for the k-th most contributing region, 0 elsewhere.
    regions: torch.Tensor | None = None
    # (N, H, W) float: each pixel's share of the margin the change gained (region methods).
    importance: torch.Tensor | None = None
    # (N, H, W) float: the explanation's ranking of the pixels, higher first (region methods).
    order: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.success)


def to_grid(x: torch.Tensor, pixels: str) -> torch.Tensor:
    """Clip to [0, 1] and, for 8-bit pixels, round to the nearest multiple of 1/255."""
    x = x.clamp(0, 1)
    return torch.round(x * 255) / 255 if pixels == "uint8" else x


def is_corrected(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return margin(logits, labels) > MIN_MARGIN


class CorrectiveAttack:
    """Base class: subclasses set `name` and implement `run`."""

    name: ClassVar[str] = ""

    def __init__(self, *, pixels: str = "uint8"):
        if pixels not in PIXELS:
            raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
        self.pixels = pixels

    def run(self, target: WhiteBoxTarget, images: torch.Tensor, labels: torch.Tensor) -> AttackResult:
        raise NotImplementedError

    def __call__(self, target, images, labels) -> AttackResult:
        return self.run(target, images, labels)

    def _start(self, target: WhiteBoxTarget, images: torch.Tensor):
        """The shared bookkeeping every attack starts from."""
        n = len(images)
        corrected = to_grid(images, self.pixels).clone()
        success = torch.zeros(n, dtype=torch.bool)
        queries = torch.zeros(n, dtype=torch.long)
        logits = torch.full((n, target.num_classes), float("nan"))
        return corrected, success, queries, logits
