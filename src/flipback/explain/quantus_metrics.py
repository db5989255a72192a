"""Faithfulness metrics that flipback did not write: Quantus's, run on saved maps (issue 14).

flipback's own deletion-to-correct removes pixels toward the same local blur that `regions`
removes them toward, so part of `regions`' lead there is by construction. These come from
Quantus (Hedström et al., JMLR 2023), the maintained library of explanation metrics:

- localisation, against the known cause's mask: `PointingGame` (the map's maximum lies in
  the mask), `RelevanceRankAccuracy` (share of the mask-sized top of the map that lies in
  the mask) and `RelevanceMassAccuracy` (share of the map's positive mass inside the mask);
- deletion: `ROAD` (Rong et al., ICML 2022): the top p% of pixels by the map are replaced by
  noisy linear imputation from their neighbours, never by a blur, and the model is asked
  again; the score is the share of images whose answer is then the *true* label (the maps
  explain errors: removing the cause should correct them), per p.

Maps are (N, H, W), higher = more responsible; masks (N, H, W) bool. Quantus is in the
`bench` extra.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

LOCALISATION = ("pointing_game", "relevance_rank_accuracy", "relevance_mass_accuracy")
ROAD_PERCENTAGES = (1, 2, 5, 10)


def _nchw(a) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a[:, None] if a.ndim == 3 else a, dtype=np.float32)


def _ordered(a: np.ndarray) -> np.ndarray:
    """Maps with no usable value (NaN or infinite read as 0) and, where a map is constant,
    a tiny ramp so that its pixels rank in row-major order, as flipback's own metrics break
    ties: Quantus refuses a constant map outright, which would stop a whole benchmark."""
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    flat = a.reshape(len(a), -1)
    constant = (flat == flat[:, :1]).all(1)
    if constant.any():
        ramp = -1e-6 * np.arange(flat.shape[1], dtype=np.float32) / flat.shape[1]
        flat = flat.copy()
        flat[constant] += ramp
    return flat.reshape(a.shape)


def localisation(maps, masks) -> dict[str, np.ndarray]:
    """Per image, Quantus's pointing game, relevance rank accuracy and relevance mass
    accuracy of `maps` against `masks` (NaN where a map has no usable value)."""
    import quantus

    a, s = _ordered(_nchw(maps)), _nchw(masks)
    x = np.zeros_like(a)  # the localisation metrics read only the maps and masks
    y = np.zeros(len(a), np.int64)
    metrics = {"pointing_game": quantus.PointingGame, "relevance_rank_accuracy": quantus.RelevanceRankAccuracy,
               "relevance_mass_accuracy": quantus.RelevanceMassAccuracy}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, metric in metrics.items():
            # Fresh copies: Quantus normalises the arrays it is given in place.
            scores = metric(disable_warnings=True)(model=None, x_batch=x.copy(), y_batch=y, a_batch=a.copy(),
                                                   s_batch=s.copy())
            out[name] = np.asarray(scores, dtype=np.float64)
    return out


def road(model: torch.nn.Module, images, labels, maps, percentages: Sequence[float] = ROAD_PERCENTAGES,
         noise: float = 0.01, device: str = "cpu", batch_size: int = 64) -> dict[float, float]:
    """Quantus's ROAD with noisy linear imputation: for each percentage p, the share of the
    images whose answer is the true label once the top p% of pixels by the map are imputed.
    `model` takes [0, 1] NCHW images; `images` (N, C, H, W) in [0, 1]; `maps` (N, H, W)."""
    import quantus

    x = _nchw(images)
    a = np.broadcast_to(_ordered(_nchw(maps)), x.shape).copy()  # every channel of a pixel goes together
    y = np.asarray(labels, np.int64)
    extra = {} if x.shape[1] == 1 else {"perturb_func": _impute_pixels}
    totals = np.zeros(len(percentages))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # One call per chunk, each one batch: Quantus 0.6's ROAD averages only its first batch.
        for start in range(0, len(x), batch_size):
            part = slice(start, start + batch_size)
            metric = quantus.ROAD(percentages=list(percentages), noise=noise, disable_warnings=True,
                                  display_progressbar=False, **extra)
            scores = metric(model=model.eval(), x_batch=x[part], y_batch=y[part], a_batch=a[part], device=device,
                            batch_size=len(x[part]))
            totals += np.array([scores[p] for p in percentages]) * len(x[part])
    return {float(p): float(t / max(1, len(x))) for p, t in zip(percentages, totals)}


def _impute_pixels(arr: np.ndarray, indices, **kwargs) -> np.ndarray:
    """Quantus 0.6's noisy linear imputation on the top pixels of a multi-channel image.

    Its ROAD ranks the map broadcast over the channels (C*H*W entries, so the top p% holds
    each top pixel's C copies), but its imputation reads the indices as pixels of one H*W
    plane: with RGB images, indices past H*W failed (IndexError) and the others named the
    wrong pixels. Here the entries become their pixels, in rank order, one per C copies: the
    top p% of the pixels, each imputed in all of its channels."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    c, hw = arr.shape[0], arr[0].size
    pixels = np.asarray(indices) % hw
    _, first = np.unique(pixels, return_index=True)
    top = pixels[np.sort(first)][: len(pixels) // c]
    return noisy_linear_imputation(arr, top, **kwargs)


def road_auc(scores: dict[float, float]) -> float:
    """Area under ROAD's curve, trapezoids from (0, 0) (the images are errors), divided by
    the last percentage: 1 if every image is corrected at the first one."""
    xs = np.array([0.0, *sorted(scores)])
    ys = np.array([0.0, *(scores[p] for p in sorted(scores))])
    return float(np.trapezoid(ys, xs) / xs[-1]) if xs[-1] > 0 else float("nan")


def mean_ranks(table: dict[str, dict[str, float]], metrics: Sequence[str]) -> dict[str, float]:
    """Each method's rank on each metric (1 = best, ties share the mean rank), averaged over
    the metrics that method has; higher metric values are better."""
    methods = list(table)
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    for metric in metrics:
        have = [m for m in methods if np.isfinite(table[m].get(metric, np.nan))]
        values = np.array([table[m][metric] for m in have])
        for m, v in zip(have, values):
            ranks[m].append(1 + float((values > v).sum()) + float((values == v).sum() - 1) / 2)
    return {m: float(np.mean(r)) if r else float("nan") for m, r in ranks.items()}
