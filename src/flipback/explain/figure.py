"""Per-image PNG figures: original | corrected | amplified change | heatmap with regions.

The figure is composed directly from the numpy arrays with Pillow: each panel is the
image at its own resolution (8-bit, heatmap blended through a 256-entry colour table),
enlarged by a whole factor with nearest-neighbour (or shrunk to fit when larger than
its panel), pasted side by side under short titles drawn with ImageDraw. No matplotlib
figure is built, so a figure costs a few milliseconds instead of ~180 ms
(``benchmarks/figure_timing.py``).

The canvas keeps the size of the earlier matplotlib figure: 10 × 2.9 inches at ``dpi``
(1000 × 290 pixels by default). Class names are user strings: they are shortened to
``_MAX_NAME`` characters and drawn verbatim as plain text (Pillow interprets no markup).
Fonts are cached per thread, so the function is safe to call from worker threads.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .regions import Explanation

_MAX_NAME = 28  # class names longer than this are shortened in titles
_FIG_INCHES = (10.0, 2.9)  # canvas size in inches, as the earlier matplotlib figure
_HEAT_ALPHA = 0.6  # weight of the heatmap colour over the original
_TITLE_LINES = 4  # at most this many title lines per panel
_REGION_RGB = (0, 255, 255)  # region outlines and labels: cyan
_FRAME_RGB = (64, 64, 64)


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


def amplified_change(delta: np.ndarray) -> np.ndarray:
    """Scale ``delta`` so its largest absolute value maps to the full range around grey 0.5."""
    d = np.asarray(delta, dtype=np.float32)
    m = float(np.abs(d).max()) if d.size else 0.0
    if m <= 0:
        return np.full_like(d, 0.5)
    return np.clip(0.5 + 0.5 * d / m, 0.0, 1.0)


# ---------------------------------------------------------------- pixels


def _to_rgb8(img: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) floats in [0, 1] -> (H, W, 3) uint8, rounded to the nearest level."""
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = a[..., None]
    elif a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"an image must be (H, W), (H, W, 1) or (H, W, 3), got shape {a.shape}")
    u8 = (np.fmin(np.fmax(a, 0.0), 1.0) * 255.0 + 0.5).astype(np.uint8)  # fmax: NaN -> 0
    return np.ascontiguousarray(np.broadcast_to(u8, (*u8.shape[:2], 3)))


@lru_cache(maxsize=None)
def _colormap_lut(name: str = "inferno") -> np.ndarray:
    """(256, 3) uint8 colour table of a matplotlib colormap, taken once."""
    import matplotlib

    lut = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    lut = np.round(lut * 255.0).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def _heat_overlay(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``base`` (H, W, 3) uint8 under the heatmap (normalised to its maximum) at alpha 0.6."""
    heat = np.asarray(heat, dtype=np.float32)
    hmax = float(heat.max()) if heat.size else 0.0
    if not hmax > 0 or heat.shape != base.shape[:2]:
        return base
    idx = np.minimum((np.clip(heat / hmax, 0.0, 1.0) * 256.0).astype(np.intp), 255)  # matplotlib's lookup
    colour = _colormap_lut()[idx].astype(np.float32)
    out = (1.0 - _HEAT_ALPHA) * base.astype(np.float32) + _HEAT_ALPHA * colour
    return np.round(out).astype(np.uint8)


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class Panel:
    """Where one panel lies on the canvas: ``box`` = its image's (left, top, right, bottom),
    exclusive ends; ``scale`` = canvas pixels per image pixel (a whole number when enlarged);
    ``column`` = (left, right) of the strip its image and title are drawn in."""

    box: tuple[int, int, int, int]
    scale: float
    column: tuple[int, int]


@dataclass(frozen=True)
class _Layout:
    size: tuple[int, int]  # canvas (width, height)
    font_px: int
    line_h: int
    panels: tuple[Panel, ...]


@lru_cache(maxsize=64)
def _layout(h: int, w: int, dpi: float) -> _Layout:
    width = max(4, int(round(_FIG_INCHES[0] * dpi)))
    height = max(4, int(round(_FIG_INCHES[1] * dpi)))
    font_px = max(6, int(round(10 * dpi / 100)))
    line_h = font_px + max(1, font_px // 5)
    margin = max(1, int(round(0.01 * width)))
    gap = max(2, int(round(0.015 * width)))
    col_w = max(1, (width - 2 * margin - 3 * gap) // 4)
    top = margin // 2 + _TITLE_LINES * line_h + max(2, font_px // 3)
    avail_h = max(1, height - top - margin)
    if col_w >= w and avail_h >= h:  # enlarge by a whole factor, nearest-neighbour
        scale = float(min(col_w // w, avail_h // h))
    else:  # shrink to fit
        scale = min(col_w / w, avail_h / h)
    iw, ih = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    panels = []
    for k in range(4):
        left = margin + k * (col_w + gap)
        x0, y0 = left + (col_w - iw) // 2, top + (avail_h - ih) // 2  # centred, titles just above
        panels.append(Panel((x0, y0, x0 + iw, y0 + ih), scale, (left, left + col_w)))
    return _Layout((width, height), font_px, line_h, tuple(panels))


def panel_boxes(shape: tuple[int, int], dpi: float = 100) -> list[Panel]:
    """The four panels' places on the canvas of :func:`save_figure` for an (H, W) image."""
    h, w = int(shape[0]), int(shape[1])
    return list(_layout(h, w, float(dpi)).panels)


# ---------------------------------------------------------------- text

_fonts = threading.local()  # FreeType faces are not shared between threads


def _font(px: int):
    cache = _fonts.__dict__.setdefault("by_size", {})
    f = cache.get(px)
    if f is None:
        f = cache[px] = _load_font(px)
    return f


def _load_font(px: int):
    # DejaVu Sans (bundled with matplotlib, a dependency) covers far more scripts than
    # Pillow's own default font; Pillow's default is the fallback.
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), px)
    except Exception:
        try:
            return ImageFont.load_default(size=px)
        except TypeError:  # Pillow < 10.1: the bitmap font, one size
            return ImageFont.load_default()


@lru_cache(maxsize=4096)
def _width(px: int, s: str) -> float:
    return float(_font(px).getlength(s))


def _text_width(font, s: str) -> float:
    return _width(font.size, s) if hasattr(font, "size") else float(font.getlength(s))


@lru_cache(maxsize=2048)
def _text_masks(px: int, s: str, stroke: int) -> tuple[tuple[int, int], Image.Image, Image.Image | None]:
    """``s`` rendered once as 8-bit coverage masks (text, and its outline when ``stroke``),
    with the offset of their top-left corner from the drawing position. Titles repeat from
    figure to figure ("(true: dog)", "where it changed"), so most lines come from here."""
    font = _font(px)
    left, top, right, bottom = (int(v) for v in font.getbbox(s, stroke_width=stroke))
    size = (max(1, right - left), max(1, bottom - top))
    fill = Image.new("L", size, 0)
    ImageDraw.Draw(fill).text((-left, -top), s, font=font, fill=255)
    outline = None
    if stroke:
        outline = Image.new("L", size, 0)
        ImageDraw.Draw(outline).text((-left, -top), s, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return (left, top), fill, outline


def _draw_text(canvas: Image.Image, xy, s: str, px: int, colour, outline_colour=None) -> None:
    (dx, dy), fill, outline = _text_masks(px, s, 1 if outline_colour is not None else 0)
    x, y = int(round(xy[0])) + dx, int(round(xy[1])) + dy
    box = (x, y, x + fill.width, y + fill.height)
    if outline is not None:
        canvas.paste(outline_colour, box, outline)
    canvas.paste(colour, box, fill)


def _ellipsize(font, s: str, width: int) -> str:
    if _text_width(font, s) <= width:
        return s
    lo, hi = 0, len(s)
    while lo < hi:  # longest prefix that fits with "…"
        mid = (lo + hi + 1) // 2
        if _text_width(font, s[:mid] + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return s[:lo] + "…"


def _wrap(font, lines: Sequence[str], width: int, max_lines: int) -> list[str]:
    """Greedy word wrap of each logical line to ``width`` pixels; at most ``max_lines``
    lines, the last one ellipsized when text is left over. Only plain spaces break lines."""
    out: list[str] = []
    for line in lines:
        if _text_width(font, line) <= width:
            out.append(line)
            continue
        cur = ""
        for word in line.split(" "):
            cand = word if not cur else f"{cur} {word}"
            if not cur or _text_width(font, cand) <= width:
                cur = cand
            else:
                out.append(cur)
                cur = word
        out.append(cur)
    if len(out) > max_lines:
        out = out[:max_lines]
        out[-1] = out[-1] + " …"
    return [_ellipsize(font, s, width) for s in out]


# ---------------------------------------------------------------- the figure


def _paste(canvas: Image.Image, rgb: np.ndarray, panel: Panel) -> None:
    x0, y0, x1, y1 = panel.box
    im = Image.fromarray(rgb, "RGB")
    if im.size != (x1 - x0, y1 - y0):
        resample = Image.Resampling.NEAREST if panel.scale >= 1 else Image.Resampling.BOX
        im = im.resize((x1 - x0, y1 - y0), resample)
    canvas.paste(im, (x0, y0))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG, every row with the "Up" filter.

    Pillow's PNG encoder tries all five filters on every row, which costs more than the
    rest of the figure. Panels enlarged with nearest-neighbour repeat each row several
    times, and the white canvas is flat, so "Up" alone leaves mostly zeros: zlib level 1
    then packs them about as tightly as Pillow at level 6, several times faster.
    """
    h, w, _ = rgb.shape
    flat = rgb.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type "Up": each byte minus the byte above it, modulo 256
    raw[0, 1:] = flat[0]  # the first row has a row of zeros above it
    np.subtract(flat[1:], flat[:-1], out=raw[1:, 1:])
    png = b"".join((
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),  # 8-bit RGB, not interlaced
        _png_chunk(b"IDAT", zlib.compress(raw, 1)),
        _png_chunk(b"IEND", b""),
    ))
    path.write_bytes(png)


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

    ``original`` / ``corrected``: (H, W, C) floats in [0, 1], C = 1 or 3. ``scores_*``:
    optional, a scalar (score of the predicted class) or a per-class vector. The PNG is
    10 × 2.9 inches at ``dpi`` pixels per inch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    orig = _to_rgb8(original)
    corr = _to_rgb8(corrected)
    if corr.shape != orig.shape:
        raise ValueError(f"original {orig.shape[:2]} and corrected {corr.shape[:2]} differ in size")
    h, w = orig.shape[:2]
    amp = _to_rgb8(amplified_change(explanation.delta))
    if amp.shape != orig.shape:  # a delta of another shape: show no change rather than fail
        amp = np.full_like(orig, 128)
    heat = _heat_overlay(orig, explanation.heatmap)

    lay = _layout(h, w, float(dpi))
    canvas = Image.new("RGB", lay.size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for rgb, panel in zip((orig, corr, amp, heat), lay.panels):
        _paste(canvas, rgb, panel)
        x0, y0, x1, y1 = panel.box
        draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=_FRAME_RGB, width=1)

    # region outlines and numbers on the heatmap panel
    hp = lay.panels[3]
    s = hp.scale
    lw = max(1, int(round(dpi / 100)))
    font = _font(lay.font_px)
    for r in reversed(explanation.regions):  # the largest share drawn last, on top
        ry0, rx0, ry1, rx1 = (int(v) for v in r.bbox)
        bx0 = hp.box[0] + int(round(rx0 * s))
        by0 = hp.box[1] + int(round(ry0 * s))
        bx1 = hp.box[0] + max(int(round(rx1 * s)) - 1, int(round(rx0 * s)))
        by1 = hp.box[1] + max(int(round(ry1 * s)) - 1, int(round(ry0 * s)))
        draw.rectangle((bx0, by0, bx1, by1), outline=_REGION_RGB, width=lw)
        _draw_text(canvas, (bx0 + lw + 1, by0 + lw), str(r.id), lay.font_px, _REGION_RGB, (0, 0, 0))

    # titles
    true_name = _name(class_names, true_label)
    before = _name(class_names, pred_before)
    after = _name(class_names, pred_after)
    linf = explanation.linf
    if explanation.regions:
        shares = ", ".join(f"{r.id}: {r.share:.0%}" for r in explanation.regions[:3])
        where = ["where it changed", f"region share {shares}"]
    else:
        where = ["where it changed", "(no change)"]
    nbsp = "\u00a0"  # the scores wrap as one piece
    score_b = _score_text(scores_before, pred_before, true_label).strip().replace(" ", nbsp)
    score_a = _score_text(scores_after, pred_after, true_label).strip().replace(" ", nbsp)
    titles = (
        [f"original — predicted: {before} {score_b}".rstrip(), f"(true: {true_name})"],
        [f"corrected — predicted: {after} {score_a}".rstrip()],
        ["change, amplified (grey = 0)", f"L2 {explanation.l2:.4f}  Linf {linf:.4f} ({linf * 255:.1f}/255)"],
        where,
    )
    for panel, lines in zip(lay.panels, titles):
        left, right = panel.column
        wrapped = _wrap(font, lines, right - left, _TITLE_LINES)
        y = panel.box[1] - max(2, lay.font_px // 3) - len(wrapped) * lay.line_h  # bottom-aligned
        cx = (left + right) / 2
        for line in wrapped:
            _draw_text(canvas, (cx - _text_width(font, line) / 2, y), line, lay.font_px, (0, 0, 0))
            y += lay.line_h

    _write_png(path, np.asarray(canvas))
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
