"""Small PNG tiles for the report's gallery, drawn with Pillow (fast; no matplotlib).

One strip per error, four panels side by side: the original, the corrected image, the
change amplified (grey = no change) and the change magnitude over the original (the page
outlines the top regions on it). Small images (up to ``TILE`` pixels) are stored at their
own resolution and the page shows them upscaled by an integer factor, nearest-neighbour
(28x28 -> 84x84, 32x32 -> 96x96): small files, quick to write. Larger images are shrunk
to fit ``TILE`` pixels.

Tiles are cached: ``tiles/manifest.json`` maps each image index to a key of what the
tile was drawn from, and a tile whose key still matches is not drawn again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

#: Target side of one panel, in pixels.
TILE = 96
#: Pixels between panels.
GAP = 3
#: Bump when the drawing changes, so cached tiles are redrawn.
VERSION = 3
_BACKGROUND = (255, 255, 255)
_MANIFEST = "manifest.json"


def tile_geometry(h: int, w: int, tile: int = TILE) -> dict:
    """Layout of the strip of an (h, w) image.

    Images up to ``tile`` pixels are stored at their own resolution, with one-pixel gaps,
    and shown ``scale`` times larger by the page (nearest-neighbour, CSS ``pixelated``);
    larger ones are shrunk to fit ``tile`` pixels, with ``GAP``-pixel gaps, and shown as
    they are. ``ph``/``pw``: one panel in the file; ``width``/``height``: the file.
    """
    h, w = max(1, int(h)), max(1, int(w))
    side = max(h, w)
    if side <= tile:
        ph, pw, gap, scale = h, w, 1, max(1, tile // side)
    else:
        f = tile / side
        ph, pw, gap, scale = max(1, round(h * f)), max(1, round(w * f)), GAP, 1
    return {"h": h, "w": w, "ph": ph, "pw": pw, "gap": gap, "scale": scale,
            "width": 4 * pw + 3 * gap, "height": ph}


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


def _panels(original: np.ndarray, corrected: np.ndarray) -> list[np.ndarray]:
    """Original, corrected, amplified change and change-over-original, each (H, W, 3) uint8."""
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
    return [_rgb(orig_u8), _rgb(corr_u8), _rgb(amp), _overlay(orig_u8, np.sqrt((delta * delta).sum(axis=-1)))]


def _overlay(orig_u8: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """The change magnitude (inferno colours) over the dimmed grey original."""
    mmax = float(magnitude.max()) if magnitude.size else 0.0
    heat = magnitude / mmax if mmax > 0 else np.zeros_like(magnitude)
    gray = _rgb(orig_u8).astype(np.float32).mean(axis=-1, keepdims=True) * 0.55
    colour = _lut()[np.round(heat * 255.0).astype(np.int64)].astype(np.float32)
    alpha = np.clip(heat * 1.6, 0.0, 0.9)[..., None]
    return np.round(gray * (1.0 - alpha) + colour * alpha).astype(np.uint8)


def _join(panels: list[np.ndarray], geo: dict) -> np.ndarray:
    ph, pw, gap = geo["ph"], geo["pw"], geo["gap"]
    out = np.empty((ph, len(panels) * pw + (len(panels) - 1) * gap, 3), np.uint8)
    out[...] = _BACKGROUND
    for k, p in enumerate(panels):
        if p.shape[:2] != (ph, pw):
            p = np.asarray(Image.fromarray(p).resize((pw, ph), Image.Resampling.BOX))
        out[:, k * (pw + gap): k * (pw + gap) + pw] = p
    return out


def strip_arrays(original: np.ndarray, corrected: np.ndarray, tile: int = TILE) -> np.ndarray:
    """The four panels side by side, as one (height, width, 3) uint8 array laid out by
    :func:`tile_geometry`. ``original``: uint8 (H, W, C); ``corrected``: uint8, or float
    in [0, 1], (H, W, C). The page draws the region outlines over the last panel."""
    panels = _panels(original, corrected)
    h, w = panels[0].shape[:2]
    return _join(panels, tile_geometry(h, w, tile))


def tile_key(rec: dict) -> str:
    return json.dumps([VERSION, TILE, rec.get("l2"), rec.get("linf"), rec.get("queries"), bool(rec.get("success"))])


def tile_name(idx: int) -> str:
    return f"{int(idx):06d}.png"


def write_tiles(tiles_dir: Path, records: list[dict],
                load: Callable[[int], tuple[np.ndarray, np.ndarray] | None]) -> dict[int, tuple[str, list[int]]]:
    """Draw the tiles that are missing or stale; return {index: (file name, [h, w])} for
    every record whose tile exists, (h, w) being the image's size. ``load(idx)`` returns
    (original, corrected) or None."""
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
    out: dict[int, tuple[str, list[int]]] = {}
    changed = False
    for rec in records:
        try:
            idx = int(rec["index"])
        except (KeyError, TypeError, ValueError):
            continue
        name, key = tile_name(idx), tile_key(rec)
        cached = manifest.get(str(idx))
        if name in existing and isinstance(cached, list) and len(cached) == 2 and cached[0] == key:
            out[idx] = (name, cached[1])
            continue
        try:
            pair = load(idx)
            if pair is None:
                continue
            arr = strip_arrays(pair[0], pair[1])
        except (ValueError, TypeError):
            continue
        Image.fromarray(arr).save(tiles_dir / name, format="PNG", compress_level=1)
        hw = [int(pair[0].shape[0]), int(pair[0].shape[1])]
        manifest[str(idx)] = [key, hw]
        out[idx] = (name, hw)
        changed = True
    if changed:
        tmp = tiles_dir / f".{_MANIFEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(manifest), encoding="utf-8")
        os.replace(tmp, manifest_path)
    return out


def write_pair_maps(pairs_dir: Path, groups: dict[tuple[int, int], list[int]],
                    load: Callable[[int], tuple[np.ndarray, np.ndarray] | None],
                    max_members: int = 300) -> dict[tuple[int, int], tuple[str, dict]]:
    """For each confusion pair, one PNG: the mean original and the mean change magnitude
    over it (a recurring cause shows as a bright spot). Images of another shape than the
    pair's first are left out. Returns {(true, pred): (file name, tile geometry)}."""
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
        geo = tile_geometry(*shape[:2])
        arr = _join([_rgb(mean_orig), _overlay(mean_orig, sum_mag / n)], geo)
        name = f"{int(t)}_{int(p)}.png"
        Image.fromarray(arr).save(pairs_dir / name, format="PNG", compress_level=1)
        out[(t, p)] = (name, geo)
    return out
