"""Per-image checks of array data sets (.npz, IDX): an image with a missing or unknown label,
or pixels that are not a valid image, is skipped with its reason; the others load."""

from __future__ import annotations

import numpy as np

from flipback.data.dataset import SkippedItem
from flipback.errors import DataError


def integer_labels(labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64, and a mask of the missing ones (NaN in a float array). Fractional
    labels are a whole-file problem: the file is not what it claims to be."""
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        return labels.astype(np.int64), np.zeros(len(labels), bool)
    if not np.issubdtype(labels.dtype, np.floating):
        raise DataError(f"labels{where} must be integers; got {labels.dtype}")
    missing = np.isnan(labels)
    ok = labels[~missing]
    if not np.isfinite(ok).all() or (ok != np.round(ok)).any():
        raise DataError(f"labels{where} must be whole numbers; found fractions or infinity")
    return np.where(missing, -1, labels).astype(np.int64), missing


def label_problems(labels: np.ndarray, missing: np.ndarray, num_classes: int | None) -> dict[int, str]:
    """{row: reason} for missing, negative or out-of-list labels (num_classes None: any >= 0)."""
    out = {int(i): "missing label: NaN" for i in np.flatnonzero(missing)}
    for i in np.flatnonzero(~missing & (labels < 0)):
        out[int(i)] = f"missing label: {labels[i]}"
    if num_classes is not None:
        for i in np.flatnonzero(labels >= num_classes):
            out[int(i)] = f"label outside the class list: {labels[i]} with {num_classes} classes"
    return out


def pixel_problems(images: np.ndarray) -> dict[int, str]:
    """{row: reason} for images that are not valid pixels: NaN or infinite values, float values
    outside [0, 1], integer values outside 0..255."""
    out: dict[int, str] = {}
    flat = images.reshape(len(images), -1)
    if np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(flat).all(1)
        inside = np.where(finite[:, None], (flat >= 0) & (flat <= 1), True).all(1)
        out.update({int(i): "non-finite pixels: NaN or infinity" for i in np.flatnonzero(~finite)})
        out.update({int(i): "pixels out of range: float values outside [0, 1]" for i in np.flatnonzero(~inside)})
    elif np.issubdtype(images.dtype, np.integer) and images.dtype != np.uint8:
        inside = ((flat >= 0) & (flat <= 255)).all(1)
        out.update({int(i): "pixels out of range: integer values outside 0..255" for i in np.flatnonzero(~inside)})
    return out


def drop(problems: dict[int, str], n: int, names: list[str], where: str) -> tuple[np.ndarray, list[SkippedItem]]:
    """Rows to keep and the skipped items; every row bad is a whole-file error."""
    skipped = [SkippedItem(names[i], problems[i]) for i in sorted(problems)]
    keep = np.array([i for i in range(n) if i not in problems], dtype=np.int64)
    if n and not len(keep):
        examples = "; ".join(sorted({s.reason for s in skipped})[:3])
        raise DataError(f"none of the {n} images{where} can be used ({examples})",
                        hint="check the file: uint8 images (N,H,W[,C]), or floats in [0, 1], and labels 0..K-1")
    return keep, skipped
