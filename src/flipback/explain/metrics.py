"""Faithfulness metrics for explanation maps: does a map point at the real cause of an error?

All maps are (N, H, W), higher = more responsible for the wrong answer. Masks are (N, H, W)
bool, True on the known cause (e.g. a planted patch).

Ranking: pixels are ranked by map value, highest first; equal values are ordered by
row-major position (earlier pixel first), so every metric is reproducible. NaN counts as
the lowest value.

- ``pointing_game``: hit when the map's maximum lies in the mask. Ties: with
  ``ties="all"`` (default) *every* pixel that attains the maximum must lie in the mask, so
  a map that cannot decide (a plateau leaving the mask, e.g. a constant map) never scores;
  ``ties="any"`` is the lenient reading (some maximal pixel lies in the mask).
- ``topk_precision``: share of the k highest pixels that lie in the mask, k = mask area
  (per image); NaN for an empty mask.
- ``deletion_to_correct``: for each fraction f the top ``round(f*H*W)`` pixel locations
  (at least one; all channels of a location) are replaced by a neutral value, a local blur
  of the image (``neutral_images``), the result is rounded to the 8-bit grid and the model
  is asked again. Success = the answer becomes the true label. AUC: trapezoid rule over
  x = (0, *fractions) with y(0) = 0 (the images are misclassified), divided by the last
  fraction, so a method that corrects every image at the first fraction scores close to 1
  and one that never corrects scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..attacks.regions import local_blur
from .regions import change_magnitude

#: Default blur of ``neutral_images``, in pixels: strong enough that a small planted patch
#: mostly disappears (a 4x4 patch keeps ~15% of its contrast), local enough to keep the
#: colours of the surroundings.
NEUTRAL_SIGMA = 4.0
DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.10)


def _check_maps(maps: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {tuple(maps.shape)}")
    if masks is not None and masks.shape != maps.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(maps.shape)} differ in shape")
    m = maps.detach().to("cpu", torch.float64)
    return torch.nan_to_num(m, nan=float("-inf"))


def rank_pixels(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, H*W) int64 rank of each pixel (0 = highest), deterministic on ties.

    A stable descending sort keeps equal values in row-major order.
    """
    flat = _check_maps(maps).flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return rank


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, ties: str = "all") -> torch.Tensor:
    """(N,) bool: the map's maximum falls in the mask (see the module docstring for ties)."""
    m = _check_maps(maps, masks).flatten(1)
    inside = masks.to("cpu", torch.bool).flatten(1)
    at_max = m == m.max(dim=1, keepdim=True).values
    if ties == "all":
        return (at_max & ~inside).sum(1) == 0
    if ties == "any":
        return (at_max & inside).any(1)
    raise ValueError(f"ties must be 'all' or 'any', got {ties!r}")


def topk_precision(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) float: share of the top-k pixels (k = mask area) inside the mask; NaN if k = 0."""
    rank = rank_pixels(maps)
    inside = masks.to("cpu", torch.bool).flatten(1)
    if inside.shape != rank.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(maps.shape)} differ in shape")
    k = inside.sum(1)
    hits = ((rank < k[:, None]) & inside).sum(1).double()
    return torch.where(k > 0, hits / k.clamp(min=1), torch.full_like(hits, float("nan"))).float()


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [0,1] pixels to the nearest of the 256 8-bit levels."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def neutral_images(images: torch.Tensor, sigma: float = NEUTRAL_SIGMA) -> torch.Tensor:
    """The "local blur" replacement: each channel Gaussian-blurred over H and W.

    scipy ``gaussian_filter`` in float64 with ``mode="reflect"`` (deterministic, no dark
    border), rounded to the 8-bit grid. Same shape, dtype and device as ``images``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    # The blur the `regions` method removes toward, so its corrections are exactly deletions.
    return local_blur(images, sigma)


def change_map(original: torch.Tensor, corrected: torch.Tensor) -> torch.Tensor:
    """A corrective change as a map: per-pixel L2 over channels, (N,C,H,W) x2 -> (N,H,W) float32.

    Same definition as the report's heatmaps (``regions.change_magnitude``), unsmoothed.
    """
    if original.shape != corrected.shape or original.ndim != 4:
        raise ValueError(f"need two (N, C, H, W) tensors of one shape, got {tuple(original.shape)} "
                         f"and {tuple(corrected.shape)}")
    delta = (corrected.detach().cpu().double() - original.detach().cpu().double()).permute(0, 2, 3, 1)
    return torch.from_numpy(change_magnitude(delta.numpy())).float()


@dataclass
class DeletionResult:
    """Deletion-to-correct for N images at F fractions."""

    fractions: tuple[float, ...]
    correct: torch.Tensor  # (N, F) bool: the answer became the true label
    rates: torch.Tensor  # (F,) float64: share of images corrected at each fraction
    auc: float  # normalised area under the rate curve, in [0, 1]

    def image_auc(self) -> torch.Tensor:
        """(N,) per-image areas under the curve; their mean is ``auc``."""
        return curve_auc(self.fractions, self.correct.double())

    def to_dict(self) -> dict:
        return {
            "fractions": [float(f) for f in self.fractions],
            "rates": [float(r) for r in self.rates],
            "auc": float(self.auc),
            "n": int(self.correct.shape[0]),
        }


def curve_auc(fractions: Sequence[float], ys: torch.Tensor) -> torch.Tensor:
    """Trapezoid area over x = (0, *fractions), y(0) = 0, divided by the last fraction.

    ``ys`` is (..., F); returns (...).
    """
    x = torch.tensor((0.0, *fractions), dtype=torch.float64)
    y = torch.cat([torch.zeros(*ys.shape[:-1], 1, dtype=torch.float64), ys.double()], dim=-1)
    area = ((y[..., 1:] + y[..., :-1]) * (x[1:] - x[:-1])).sum(-1) / 2
    return area / x[-1]


def deletion_counts(fractions: Sequence[float], h: int, w: int) -> list[int]:
    """Pixel locations deleted at each fraction: round half up of f*H*W, at least one."""
    return [max(1, int(np.floor(f * h * w + 0.5))) for f in fractions]


def deletion_to_correct(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    batch_size: int = 256,
    neutral: torch.Tensor | None = None,
) -> DeletionResult:
    """Share of errors that become correct when the top pixels of ``maps`` are neutralised.

    ``predict`` maps (n, C, H, W) [0,1] pixels to scores (n, K). ``neutral`` overrides the
    replacement images (default ``neutral_images(images)``). Images are processed in
    chunks so that each ``predict`` call sees about ``batch_size`` deleted images (all
    fractions of a chunk of images together).
    """
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions) or list(fractions) != sorted(set(fractions)):
        raise ValueError(f"fractions must be increasing values in (0, 1], got {fractions}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    if maps.shape != (n, h, w):
        raise ValueError(f"maps must have shape {(n, h, w)}, got {tuple(maps.shape)}")
    labels = torch.as_tensor(labels).to("cpu", torch.long)
    f_count = len(fractions)
    if n == 0:
        empty = torch.zeros(0, f_count, dtype=torch.bool)
        return DeletionResult(fractions, empty, torch.full((f_count,), float("nan"), dtype=torch.float64),
                              float("nan"))

    x = images.detach().cpu().float()
    neutral = neutral_images(x) if neutral is None else neutral.detach().cpu().float()
    rank = rank_pixels(maps).view(n, 1, h, w)
    counts = torch.tensor(deletion_counts(fractions, h, w)).view(f_count, 1, 1, 1, 1)

    correct = torch.zeros(n, f_count, dtype=torch.bool)
    chunk = max(1, batch_size // f_count)
    with torch.no_grad():
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            # (F, n, 1, H, W) masks, nested across fractions; broadcast over channels.
            drop = rank[s:e].unsqueeze(0) < counts
            deleted = to_8bit(torch.where(drop, neutral[s:e].unsqueeze(0), x[s:e].unsqueeze(0)))
            scores = predict(deleted.reshape(f_count * (e - s), c, h, w))
            answers = torch.as_tensor(scores).detach().cpu().argmax(1).view(f_count, e - s)
            correct[s:e] = (answers == labels[s:e].unsqueeze(0)).T
    rates = correct.double().mean(0)
    return DeletionResult(fractions, correct, rates, float(curve_auc(fractions, rates)))


def pattern_correlation(maps: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Per image, Pearson's correlation between a map and a maskless cause's pattern (the
    blended cue, issue 14): 1 when the map is the pattern up to scale and offset, 0 for a
    map unrelated to it; 0 where either is constant."""
    a = torch.nan_to_num(maps.float().flatten(1))
    b = patterns.float().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-12), torch.zeros_like(den))


def parts_found(maps: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """(N,) bool: every part of a cue (N,P,H,W bool, e.g. both patches of an AND/OR cue) holds
    at least one of the map's top-k pixels, k = the union's area."""
    k = parts.any(1).flatten(1).sum(1)  # (N,) the union's area
    chosen = rank_pixels(maps) < k[:, None]  # (N, H*W): pixel among the top k
    return (parts.flatten(2) & chosen[:, None]).any(2).all(1)
