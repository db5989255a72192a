"""Per-image PNG figures: original | corrected | amplified change | heatmap with regions.

Uses matplotlib's object API (``Figure`` + Agg canvas) only: no pyplot, no global
state, safe to call from worker threads. Class names are user strings and are drawn
verbatim: mathtext (``$...$``) and TeX are switched off on every text object.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .regions import Explanation

_MAX_NAME = 28  # class names longer than this are shortened in titles


def _name(class_names: Sequence[str] | None, label) -> str:
    try:
        i = int(label)
    except (TypeError, ValueError):
        return _short(str(label))
    if class_names is not None and 0 <= i < len(class_names):
        return _short(str(class_names[i]))
    return str(i)


def _short(s: str) -> str:
    s = " ".join(s.split())  # no newlines or tabs in titles
    return s if len(s) <= _MAX_NAME else s[: _MAX_NAME - 1] + "…"


def _score_text(scores, label, true_label) -> str:
    """Describe scores: a scalar is shown as is; a per-class vector as p(pred) and p(true)."""
    if scores is None:
        return ""
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 1:
        return f" ({arr[0]:.3g})"
    parts = []
    for lab, tag in ((label, "pred"), (true_label, "true")):
        try:
            i = int(lab)
        except (TypeError, ValueError):
            continue
        if 0 <= i < arr.size:
            parts.append(f"{tag} {arr[i]:.3g}")
    return f" ({', '.join(parts)})" if parts else ""


def _to_display(img: np.ndarray) -> tuple[np.ndarray, dict]:
    """(H, W, C) float -> array and imshow kwargs (gray colormap for one channel)."""
    img = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if img.ndim == 3 and img.shape[-1] == 1:
        return img[..., 0], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    if img.ndim == 2:
        return img, {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    return img, {}


def amplified_change(delta: np.ndarray) -> np.ndarray:
    """Scale ``delta`` so its largest absolute value maps to the full range around grey 0.5."""
    d = np.asarray(delta, dtype=np.float32)
    m = float(np.abs(d).max()) if d.size else 0.0
    if m <= 0:
        return np.full_like(d, 0.5)
    return np.clip(0.5 + 0.5 * d / m, 0.0, 1.0)


def save_figure(
    path,
    original: np.ndarray,
    corrected: np.ndarray,
    explanation: Explanation,
    *,
    class_names: Sequence[str] | None,
    true_label,
    pred_before,
    pred_after,
    scores_before=None,
    scores_after=None,
    dpi: int = 100,
) -> Path:
    """Write a 4-panel PNG explaining one corrected image; returns the path.

    ``original`` / ``corrected``: (H, W, C) floats in [0, 1]. ``scores_*``: optional, a
    scalar (score of the predicted class) or a per-class vector.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text_kw = {"parse_math": False, "usetex": False, "fontsize": 7}

    true_name = _name(class_names, true_label)
    before = _name(class_names, pred_before)
    after = _name(class_names, pred_after)

    fig = Figure(figsize=(10.0, 2.9), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.03, top=0.84, wspace=0.06)

    img, kw = _to_display(original)
    axes[0].imshow(img, interpolation="nearest", **kw)
    axes[0].set_title(
        f"original — predicted: {before}{_score_text(scores_before, pred_before, true_label)}"
        f"\n(true: {true_name})",
        **text_kw,
    )

    img_c, kw_c = _to_display(corrected)
    axes[1].imshow(img_c, interpolation="nearest", **kw_c)
    axes[1].set_title(
        f"corrected — predicted: {after}{_score_text(scores_after, pred_after, true_label)}",
        **text_kw,
    )

    amp, kw_a = _to_display(amplified_change(explanation.delta))
    axes[2].imshow(amp, interpolation="nearest", **kw_a)
    linf = explanation.linf
    axes[2].set_title(
        f"change, amplified (grey = 0)\nL2 {explanation.l2:.4f}  Linf {linf:.4f} ({linf * 255:.1f}/255)",
        **text_kw,
    )

    axes[3].imshow(img, interpolation="nearest", **kw)
    heat = np.asarray(explanation.heatmap, dtype=np.float32)
    hmax = float(heat.max()) if heat.size else 0.0
    if hmax > 0:
        axes[3].imshow(heat / hmax, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
    for r in explanation.regions:
        y0, x0, y1, x1 = r.bbox
        axes[3].add_patch(
            Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1.0)
        )
        axes[3].text(
            x0 - 0.4, y0 - 0.4, str(r.id), color="cyan", va="top", ha="left",
            fontsize=7, fontweight="bold", parse_math=False, usetex=False,
        )
    if explanation.regions:
        shares = ", ".join(f"{r.id}: {r.share:.0%}" for r in explanation.regions[:3])
        title = f"where it changed\nregion share {shares}"
    else:
        title = "where it changed\n(no change)"
    axes[3].set_title(title, **text_kw)

    h, w = heat.shape if heat.ndim == 2 else img.shape[:2]
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)

    fig.savefig(path, format="png", dpi=dpi)
    return path


def save_figures(
    paths: Sequence,
    originals: np.ndarray,
    corrected: np.ndarray,
    explanations: Sequence[Explanation],
    *,
    class_names: Sequence[str] | None,
    true_labels: Sequence,
    preds_before: Sequence,
    preds_after: Sequence,
    scores_before: Sequence | None = None,
    scores_after: Sequence | None = None,
    dpi: int = 100,
) -> list[Path]:
    """Batch helper around :func:`save_figure`; all sequences are indexed together."""
    n = len(explanations)
    for name, seq in (("paths", paths), ("originals", originals), ("corrected", corrected),
                      ("true_labels", true_labels), ("preds_before", preds_before),
                      ("preds_after", preds_after)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} items, expected {n}")
    out = []
    for i in range(n):
        out.append(
            save_figure(
                paths[i], originals[i], corrected[i], explanations[i],
                class_names=class_names, true_label=true_labels[i],
                pred_before=preds_before[i], pred_after=preds_after[i],
                scores_before=None if scores_before is None else scores_before[i],
                scores_after=None if scores_after is None else scores_after[i],
                dpi=dpi,
            )
        )
    return out
