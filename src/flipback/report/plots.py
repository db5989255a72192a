"""The report's plots, drawn with matplotlib's object API (``Figure`` + Agg canvas): no
pyplot, no global state. Each plot takes one or more series (a run, or the methods of a
benchmark), each a list of per-image records.

- ``l2.png``: the distribution of the change's L2 norm over the corrected images.
- ``queries.png``: the queries spent per image (corrected and not corrected).
- ``budget.png``: success rate against the query budget: the share of all explained
  errors corrected within b queries, read off the per-image query counts.
- ``frontier.png``: success and the median L2 of the corrections against the queries
  spent, read off the per-image traces (the answer each image had after q queries), for
  runs whose records have them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#a16207"]
OK_COLOR, FAIL_COLOR = "#16a34a", "#dc2626"
_TEXT = {"parse_math": False, "usetex": False}
_DPI = 144


def _finite(values) -> np.ndarray:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return np.asarray(out, dtype=float)


def _queries(recs) -> tuple[np.ndarray, np.ndarray]:
    q, ok = [], []
    for r in recs:
        try:
            v = float(r.get("queries"))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            q.append(v)
            ok.append(bool(r.get("success")))
    return np.asarray(q, float), np.asarray(ok, bool)


def _figure(w=5.4, h=3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(True, color="#e5e7eb", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8)
    return fig, ax


def _empty(ax, text="no data"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#6b7280", **_TEXT)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> None:
    fig.tight_layout(pad=0.6)
    fig.savefig(path, format="png", dpi=_DPI)


def plot_l2(path: Path, series: dict[str, list[dict]]) -> None:
    fig, ax = _figure()
    vals = {k: _finite(r.get("l2") for r in recs if r.get("success")) for k, recs in series.items()}
    vals = {k: v[v >= 0] for k, v in vals.items()}
    allv = np.concatenate([v for v in vals.values()]) if vals else np.array([])
    if allv.size == 0:
        _empty(ax, "no corrected images")
    else:
        pos = allv[allv > 0]
        log = pos.size == allv.size and pos.size > 1 and pos.max() / pos.min() > 30
        if log:
            bins = np.geomspace(pos.min(), pos.max() * 1.0001, 40)
            ax.set_xscale("log")
        else:
            hi = float(allv.max()) if allv.max() > allv.min() else float(allv.max()) + 1e-3
            bins = np.linspace(float(allv.min()), hi, 40)
        single = len(vals) == 1
        for k, (name, v) in enumerate(vals.items()):
            if v.size == 0:
                continue
            colour = PALETTE[k % len(PALETTE)]
            med = float(np.median(v))
            label = f"median {med:.4g}" if single else f"{name} (median {med:.4g})"
            if single:
                ax.hist(v, bins=bins, color=colour, alpha=0.85)
            else:
                ax.hist(v, bins=bins, histtype="step", linewidth=1.6, color=colour)
            ax.axvline(med, color=colour, linestyle="--", linewidth=1.2, label=label)
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("L2 norm of the change (pixels in [0, 1])", fontsize=9, **_TEXT)
    ax.set_ylabel("corrected images", fontsize=9, **_TEXT)
    _save(fig, path)


def plot_queries(path: Path, series: dict[str, list[dict]]) -> None:
    fig, ax = _figure()
    data = {k: _queries(recs) for k, recs in series.items()}
    allq = np.concatenate([q for q, _ in data.values()]) if data else np.array([])
    if allq.size == 0:
        _empty(ax)
    else:
        lo, hi = float(allq.min()), float(allq.max())
        integer = np.all(allq == np.round(allq))
        if integer and hi - lo <= 60:
            bins = np.arange(lo - 0.5, hi + 1.5, 1.0)
        else:
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        if len(data) == 1:
            q, ok = next(iter(data.values()))
            ax.hist([q[ok], q[~ok]], bins=bins, stacked=True, color=[OK_COLOR, FAIL_COLOR],
                    label=[f"corrected ({int(ok.sum())})", f"not corrected ({int((~ok).sum())})"])
            ax.axvline(float(q.mean()), color="#111827", linestyle="--", linewidth=1.2,
                       label=f"mean {q.mean():.3g}")
        else:
            for k, (name, (q, _)) in enumerate(data.items()):
                if q.size:
                    ax.hist(q, bins=bins, histtype="step", linewidth=1.6, color=PALETTE[k % len(PALETTE)],
                            label=f"{name} (mean {q.mean():.3g})")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("queries per image", fontsize=9, **_TEXT)
    ax.set_ylabel("images", fontsize=9, **_TEXT)
    _save(fig, path)


def success_curve(recs) -> tuple[np.ndarray, np.ndarray]:
    """(budgets, success rate): the share of all records corrected within b queries."""
    q, ok = _queries(recs)
    if q.size == 0:
        return np.array([]), np.array([])
    top = max(1.0, float(q.max()))
    budgets = np.arange(0, math.ceil(top) + 1, dtype=float)
    succ = np.sort(q[ok])
    rate = np.searchsorted(succ, budgets, side="right") / q.size
    return budgets, rate


def plot_budget(path: Path, series: dict[str, list[dict]], published: dict | None = None,
                budget=None) -> None:
    fig, ax = _figure()
    drawn = False
    for k, (name, recs) in enumerate(series.items()):
        b, rate = success_curve(recs)
        if b.size == 0:
            continue
        drawn = True
        label = None if len(series) == 1 else name
        ax.step(b, rate * 100, where="post", color=PALETTE[k % len(PALETTE)], linewidth=1.8, label=label)
    if not drawn:
        _empty(ax)
    else:
        try:
            pub = float((published or {}).get("success_rate"))
        except (TypeError, ValueError):
            pub = float("nan")
        if math.isfinite(pub):
            ax.axhline(pub * 100, color="#6b7280", linestyle=":", linewidth=1.4,
                       label=f"published: {pub:.2%}")
        try:
            bud = float(budget)
        except (TypeError, ValueError):
            bud = float("nan")
        if math.isfinite(bud):
            ax.axvline(bud, color="#9ca3af", linestyle="--", linewidth=1.0, label=f"run budget {bud:g}")
        ax.set_ylim(0, 102)
        ax.set_xlim(left=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set_xlabel("query budget (queries per image)", fontsize=9, **_TEXT)
    ax.set_ylabel("errors corrected (%)", fontsize=9, **_TEXT)
    _save(fig, path)


def _events(trace) -> tuple[np.ndarray, np.ndarray] | None:
    """A record's trace as (queries, L2 with NaN for 'not corrected'), or None if unusable."""
    if not isinstance(trace, list):
        return None
    q, v = [], []
    for e in trace:
        if not (isinstance(e, (list, tuple)) and len(e) == 2):
            return None
        try:
            q.append(float(e[0]))
            v.append(float("nan") if e[1] is None else float(e[1]))
        except (TypeError, ValueError):
            return None
    return np.asarray(q, float), np.asarray(v, float)


def frontier(recs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries q = 0..max, success rate, median L2 of the corrected images) had each image
    stopped after q queries, from the records' traces; records without a trace (runs made
    before traces were kept) are left out. Empty arrays when none has one."""
    traces = [t for t in (_events(r.get("trace")) for r in recs) if t is not None]
    if not traces:
        return np.array([]), np.array([]), np.array([])
    top = max([int(q.max()) for q, _ in traces if q.size] + [1])
    budgets = np.arange(0, top + 1, dtype=float)
    sizes = np.full((len(traces), budgets.size), np.nan)
    for k, (q, v) in enumerate(traces):  # a few events per image: once per report, not a hot path
        at = np.searchsorted(q, budgets, side="right") - 1  # the last event at or before each q
        sizes[k] = np.where(at >= 0, v[np.clip(at, 0, None)] if v.size else np.nan, np.nan)
    corrected = np.isfinite(sizes)
    with np.errstate(all="ignore"):
        median = np.array([np.median(col[np.isfinite(col)]) if np.isfinite(col).any() else np.nan
                           for col in sizes.T])
    return budgets, corrected.mean(0), median


def plot_frontier(path: Path, series: dict[str, list[dict]]) -> bool:
    """Success (top) and median L2 (bottom) against queries; False (nothing written) when no
    record has a trace."""
    curves = {name: frontier(recs) for name, recs in series.items()}
    curves = {k: c for k, c in curves.items() if c[0].size}
    if not curves:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 4.4), dpi=_DPI)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax in (top, bottom):
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.grid(True, color="#e5e7eb", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=8)
    for k, (name, (q, rate, median)) in enumerate(curves.items()):
        colour = PALETTE[k % len(PALETTE)]
        label = None if len(curves) == 1 else name
        top.step(q, rate * 100, where="post", color=colour, linewidth=1.8, label=label)
        bottom.step(q, median, where="post", color=colour, linewidth=1.8, label=label)
    top.set_ylim(0, 102)
    top.set_ylabel("corrected (%)", fontsize=9, **_TEXT)
    bottom.set_ylabel("median L2 of the\ncorrected images", fontsize=9, **_TEXT)
    bottom.set_xlabel("queries spent per image", fontsize=9, **_TEXT)
    bottom.set_xlim(left=0)
    if len(curves) > 1:
        top.legend(fontsize=8, frameon=False, loc="lower right")
    _save(fig, path)
    return True


def write_plots(plots_dir: Path, series: dict[str, list[dict]], *, published: dict | None = None,
                budget=None) -> dict[str, str]:
    """Write the plots; return {kind: file name} (the frontier only where records have traces)."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_l2(plots_dir / "l2.png", series)
    plot_queries(plots_dir / "queries.png", series)
    plot_budget(plots_dir / "budget.png", series, published, budget)
    files = {"l2": "l2.png", "queries": "queries.png", "budget": "budget.png"}
    if plot_frontier(plots_dir / "frontier.png", series):
        files["frontier"] = "frontier.png"
    return files
