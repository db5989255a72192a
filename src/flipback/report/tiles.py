"""Small PNG tiles for the report's gallery, drawn with Pillow (fast; no matplotlib).

One strip per error, four panels side by side: the original, the corrected image, the
change amplified (grey = no change) and the change magnitude over the original with the
top regions outlined. Images are upscaled by an integer factor with nearest-neighbour
(28x28 -> 84x84, 32x32 -> 96x96) or shrunk to fit ``TILE`` pixels when larger.

Tiles are cached: ``tiles/manifest.json`` maps each image index to a key of what the
tile was drawn from, and a tile whose key still matches is not drawn again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Target side of one panel, in pixels.
TILE = 96
#: Pixels between panels.
GAP = 3
#: Bump when the drawing changes, so cached tiles are redrawn.
VERSION = 2
#: Outline colours of regions 1, 2, 3 (the page uses the same ones).
REGION_COLORS = [(0, 229, 255), (255, 212, 0), (255, 79, 216)]
_BACKGROUND = (255, 255, 255)
_MANIFEST = "manifest.json"


def panel_scale(h: int, w: int, tile: int = TILE) -> tuple[int, int]:
    """(height, width) of one panel for an (h, w) image."""
    side = max(h, w, 1)
    if side <= tile:
        f = max(1, tile // side)
        return h * f, w * f
    s = tile / side
    return max(1, round(h * s)), max(1, round(w * s))


def _inferno_lut() -> np.ndarray:
    try:
        from matplotlib import colormaps

        return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    except Exception:  # pragma: no cover - matplotlib is a dependency; keep tiles working anyway
        t = np.linspace(0.0, 1.0, 256)[:, None]
        return (np.clip(np.hstack([1.6 * t, 1.6 * t - 0.6, 0.4 - 0.4 * t + 0.2 * (t > 0.8)]), 0, 1) * 255).astype(np.uint8)


_LUT: np.ndarray | None = None


def _lut() -> np.ndarray:
    global _LUT
    if _LUT is None:
        _LUT = _inferno_lut()
    return _LUT


def _rgb(img: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> (H, W, 3) uint8."""
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        return np.repeat(img, 3, axis=-1)
    return img[..., :3]


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor, else a box-filtered shrink."""
    h, w = img.shape[:2]
    th, tw = size
    if (th, tw) == (h, w):
        return img
    if th % h == 0 and tw % w == 0 and th >= h:
        return np.repeat(np.repeat(img, th // h, axis=0), tw // w, axis=1)
    return np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.BOX))


def strip_arrays(original: np.ndarray, corrected: np.ndarray, regions: Iterable[dict] = (),
                 tile: int = TILE) -> np.ndarray:
    """The four panels as one (h, 4*w + 3*GAP, 3) uint8 array.

    ``original``: uint8 (H, W, C). ``corrected``: uint8, or float in [0, 1], (H, W, C).
    ``regions``: ranked region dicts with ``bbox`` = [y0, x0, y1, x1] (exclusive ends).
    """
    orig = np.asarray(original)
    if orig.ndim == 2:
        orig = orig[..., None]
    orig_u8 = orig.astype(np.uint8, copy=False)
    corr = np.asarray(corrected)
    if corr.ndim == 2:
        corr = corr[..., None]
    if corr.dtype == np.uint8:
        corr_f = corr.astype(np.float32) / 255.0
        corr_u8 = corr
    else:
        corr_f = np.clip(np.nan_to_num(corr.astype(np.float32)), 0.0, 1.0)
        corr_u8 = np.round(corr_f * 255.0).astype(np.uint8)
    if corr_f.shape != orig_u8.shape:
        raise ValueError(f"corrected {corr_f.shape} and original {orig_u8.shape} differ in shape")
    delta = corr_f - orig_u8.astype(np.float32) / 255.0

    m = float(np.abs(delta).max()) if delta.size else 0.0
    amp = np.full(delta.shape, 128, np.uint8) if m <= 0 else \
        np.round(np.clip(0.5 + 0.5 * delta / m, 0.0, 1.0) * 255.0).astype(np.uint8)

    mag = np.sqrt((delta * delta).sum(axis=-1))
    mmax = float(mag.max()) if mag.size else 0.0
    heat = mag / mmax if mmax > 0 else np.zeros_like(mag)
    gray = _rgb(orig_u8).astype(np.float32).mean(axis=-1, keepdims=True) * 0.55
    colour = _lut()[np.round(heat * 255.0).astype(np.int64)].astype(np.float32)
    alpha = np.clip(heat * 1.6, 0.0, 0.9)[..., None]
    overlay = np.round(gray * (1.0 - alpha) + colour * alpha).astype(np.uint8)

    h, w = orig_u8.shape[:2]
    ph, pw = panel_scale(h, w, tile)
    panels = [_resize(_rgb(orig_u8), (ph, pw)), _resize(_rgb(corr_u8), (ph, pw)),
              _resize(_rgb(amp), (ph, pw)), _resize(overlay, (ph, pw))]

    over = Image.fromarray(panels[3])
    draw = ImageDraw.Draw(over)
    sy, sx = ph / h, pw / w
    for colour_rgb, r in zip(REGION_COLORS, list(regions)[: len(REGION_COLORS)]):
        try:
            y0, x0, y1, x1 = (float(v) for v in r["bbox"])
        except (KeyError, TypeError, ValueError):
            continue
        box = [round(x0 * sx), round(y0 * sy), round(x1 * sx) - 1, round(y1 * sy) - 1]
        if box[2] >= box[0] and box[3] >= box[1]:
            draw.rectangle(box, outline=colour_rgb, width=1 if min(ph, pw) < 48 else 2)
    panels[3] = np.asarray(over)

    out = np.empty((ph, 4 * pw + 3 * GAP, 3), np.uint8)
    out[...] = _BACKGROUND
    for k, p in enumerate(panels):
        out[:, k * (pw + GAP): k * (pw + GAP) + pw] = p
    return out


def tile_key(rec: dict) -> str:
    return json.dumps([VERSION, TILE, rec.get("l2"), rec.get("queries"), bool(rec.get("success")),
                       [r.get("bbox") for r in (rec.get("regions") or [])[:3] if isinstance(r, dict)]])


def tile_name(idx: int) -> str:
    return f"{int(idx):06d}.png"


def write_tiles(tiles_dir: Path, records: list[dict],
                load: Callable[[int], tuple[np.ndarray, np.ndarray] | None]) -> dict[int, str]:
    """Draw the tiles that are missing or stale; return {index: file name} for every
    record whose tile exists. ``load(idx)`` returns (original, corrected) or None."""
    tiles_dir = Path(tiles_dir)
    tiles_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = tiles_dir / _MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            manifest = {}
    except (OSError, ValueError):
        manifest = {}
    existing = set(os.listdir(tiles_dir))
    out: dict[int, str] = {}
    changed = False
    for rec in records:
        try:
            idx = int(rec["index"])
        except (KeyError, TypeError, ValueError):
            continue
        name, key = tile_name(idx), tile_key(rec)
        if name in existing and manifest.get(str(idx)) == key:
            out[idx] = name
            continue
        try:
            pair = load(idx)
            if pair is None:
                continue
            arr = strip_arrays(pair[0], pair[1], rec.get("regions") or [])
        except (ValueError, TypeError):
            continue
        Image.fromarray(arr).save(tiles_dir / name, format="PNG", compress_level=3)
        manifest[str(idx)] = key
        out[idx] = name
        changed = True
    if changed:
        tmp = tiles_dir / f".{_MANIFEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(manifest), encoding="utf-8")
        os.replace(tmp, manifest_path)
    return out


def write_pair_maps(pairs_dir: Path, groups: dict[tuple[int, int], list[int]],
                    load: Callable[[int], tuple[np.ndarray, np.ndarray] | None],
                    max_members: int = 300) -> dict[tuple[int, int], str]:
    """For each confusion pair, one PNG: the mean original and the mean change magnitude
    over it (a recurring cause shows as a bright spot). Images of another shape than the
    pair's first are left out. Returns {(true, pred): file name}."""
    pairs_dir = Path(pairs_dir)
    pairs_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for (t, p), members in groups.items():
        shape = None
        sum_orig = sum_mag = None
        n = 0
        for idx in members[:max_members]:
            pair = load(idx)
            if pair is None:
                continue
            orig, corr = np.asarray(pair[0]), np.asarray(pair[1])
            if shape is None:
                shape = orig.shape
                sum_orig = np.zeros(shape, np.float64)
                sum_mag = np.zeros(shape[:2], np.float64)
            if orig.shape != shape or corr.shape != shape:
                continue
            o = orig.astype(np.float32) / 255.0
            c = corr.astype(np.float32) / 255.0 if corr.dtype == np.uint8 else corr.astype(np.float32)
            d = c - o
            sum_orig += o
            sum_mag += np.sqrt((d * d).sum(axis=-1))
            n += 1
        if n == 0:
            continue
        mean_orig = np.round(np.clip(sum_orig / n, 0, 1) * 255).astype(np.uint8)
        mag = sum_mag / n
        mmax = float(mag.max())
        heat = mag / mmax if mmax > 0 else mag
        gray = _rgb(mean_orig).astype(np.float32).mean(axis=-1, keepdims=True) * 0.55
        colour = _lut()[np.round(heat * 255).astype(np.int64)].astype(np.float32)
        alpha = np.clip(heat * 1.6, 0.0, 0.9)[..., None]
        overlay = np.round(gray * (1 - alpha) + colour * alpha).astype(np.uint8)
        h, w = shape[:2]
        ph, pw = panel_scale(h, w)
        arr = np.empty((ph, 2 * pw + GAP, 3), np.uint8)
        arr[...] = _BACKGROUND
        arr[:, :pw] = _resize(_rgb(mean_orig), (ph, pw))
        arr[:, pw + GAP:] = _resize(overlay, (ph, pw))
        name = f"{int(t)}_{int(p)}.png"
        Image.fromarray(arr).save(pairs_dir / name, format="PNG", compress_level=3)
        out[(t, p)] = name
    return out
