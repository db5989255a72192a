"""Recurring causes: do the errors of one confusion pair (true -> predicted) share a region?

For each pair, every corrected error's change becomes a heatmap (``smooth_heatmaps``: the
per-pixel change magnitude, smoothed, summing to 1). The pair's **consistency** is the mean
cosine similarity between the heatmaps of two different errors of the pair: 1 when all the
changes sit in the same place, near the value for unrelated changes when they do not. The
same number over all corrected errors of the run, whatever their pair, is the **reference**:
a pair above it shares a region more than errors in general do. The pair's **region** is
the bounding box of the part of its mean heatmap that carries half its mass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .regions import _regions_for_image, change_magnitude, smooth_heatmaps

if TYPE_CHECKING:  # the runner passes its records; nothing here depends on the store
    from ..store.record import ImageRecord

MIN_ERRORS = 3


def mean_pairwise_cosine(maps: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of distinct rows of (n, d) maps, in O(n d):
    with unit rows u_i, sum over i != j of u_i . u_j = |sum u_i|^2 - n."""
    norms = np.linalg.norm(maps, axis=1, keepdims=True)
    unit = maps[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    n = len(unit)
    if n < 2:
        return float("nan")
    total = unit.sum(0)
    return float((total @ total - n) / (n * (n - 1)))


def _heatmap(pair, sigma: float) -> np.ndarray | None:
    original, corrected = np.asarray(pair[0]), np.asarray(pair[1])
    o = original.astype(np.float32) / 255.0
    c = corrected.astype(np.float32) / 255.0 if corrected.dtype == np.uint8 else corrected.astype(np.float32)
    if o.shape != c.shape:
        return None
    return smooth_heatmaps(change_magnitude((c - o)[None]), sigma)[0]


def recurring_causes(records: Sequence["ImageRecord"], load: Callable[[int], tuple | None], classes: Sequence[str], *,
                     min_errors: int = MIN_ERRORS, max_members: int = 300, sigma: float = 1.0) -> dict:
    """{"reference": float, "pairs": [{true, pred, true_name, pred_name, n, consistency, region}]}
    over the corrected errors in `records`; `load(index)` gives (original, corrected) arrays."""
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    shape = None
    for r in records:
        if not r.success:
            continue
        key = (int(r.true), int(r.pred_before))
        if len(groups.get(key, ())) >= max_members:
            continue
        pair = load(int(r.index))
        heat = _heatmap(pair, sigma) if pair is not None else None
        if heat is None or (shape is not None and heat.shape != shape):
            continue
        shape = heat.shape
        groups.setdefault(key, []).append(heat)
    everything = [h for maps in groups.values() for h in maps]
    reference = mean_pairwise_cosine(np.stack([h.ravel() for h in everything])) if len(everything) > 1 else None
    pairs = []
    for (t, p), maps in groups.items():
        if len(maps) < min_errors:
            continue
        stack = np.stack(maps)
        mean = stack.mean(0)
        regions, _ = _regions_for_image(mean, mean, max_regions=1, mass=0.5)
        pairs.append({"true": t, "pred": p, "true_name": str(classes[t]), "pred_name": str(classes[p]),
                      "n": len(maps), "consistency": mean_pairwise_cosine(stack.reshape(len(maps), -1)),
                      "region": list(regions[0].bbox) if regions else None})
    pairs.sort(key=lambda d: (-d["n"], d["true"], d["pred"]))
    return {"reference": reference, "pairs": pairs}
