"""Splitting images into regions: the search space of the `regions` method.

- "slic": SLIC superpixels (scikit-image), which follow edges, so a region is a part of
  the object or of the background rather than an arbitrary square. scikit-image has no
  batched SLIC; it costs about a millisecond per small image, next to tens of model passes.
- "grid": square cells, fully batched; the choice when a region should not depend on the
  image's content.
"""

from __future__ import annotations

import numpy as np
import torch

SEGMENTATIONS = ("slic", "grid")


#: The most regions an image is split into by default: a 14 x 14 grid's worth, the patch
#: grid of a ViT-B/16 at 224 px (a region of about 16 x 16 pixels there).
MAX_SEGMENTS = 196


def default_segments(h: int, w: int) -> int:
    """The rule: one region per 10 pixels, at least 4 and at most 196 (`MAX_SEGMENTS`).

    Up to 44 x 44 images this is one region per 10 pixels (102 on 32x32, 78 on 28x28): a region
    then fits in about 1% of the image, small enough to name a cause, large enough that few are
    needed. Larger images get 196 regions, whatever their size (about 16 x 16 pixels at 224 px),
    so that measuring each region once (one query each) stays within the method's default
    per-image budget of 250 queries, and the per-region tensors stay (images x 196)."""
    return max(4, min(MAX_SEGMENTS, (h * w) // 10))


def grid_segments(n: int, h: int, w: int, n_segments: int, device=None) -> torch.Tensor:
    side = max(1, round((h * w / n_segments) ** 0.5))
    rows = torch.arange(h, device=device) // side
    cols = torch.arange(w, device=device) // side
    per_row = int(cols.max()) + 1
    return (rows[:, None] * per_row + cols[None, :]).expand(n, h, w).clone()


def slic_segments(images: torch.Tensor, n_segments: int, compactness: float) -> torch.Tensor:
    from skimage.segmentation import slic

    arr = images.permute(0, 2, 3, 1).double().cpu().numpy()
    gray = arr.shape[-1] == 1
    out = np.stack([
        slic(a[..., 0] if gray else a, n_segments=n_segments, compactness=compactness, start_label=0,
             channel_axis=None if gray else -1, convert2lab=False)
        for a in arr
    ])
    return torch.from_numpy(out.astype(np.int64)).to(images.device)


def segment(images: torch.Tensor, method: str = "slic", n_segments: int | None = None,
            compactness: float = 0.1) -> torch.Tensor:
    """(N,C,H,W) in [0,1] -> (N,H,W) int64 region ids, 0..S-1 per image.

    SLIC runs on [0,1] values (no Lab conversion), where a compactness of about 0.1 weighs
    colour and distance evenly."""
    if method not in SEGMENTATIONS:
        raise ValueError(f"segmentation must be one of {SEGMENTATIONS}, got {method!r}")
    n, _, h, w = images.shape
    k = n_segments or default_segments(h, w)
    if method == "grid":
        return grid_segments(n, h, w, k, images.device)
    return slic_segments(images, k, compactness)
