"""A .npz with `images` (N,H,W[,C]), `labels` (N,) and optional `classes`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from flipback.data import fingerprint
from flipback.data.dataset import Dataset
from flipback.data.labels import drop, integer_labels, label_problems, pixel_problems
from flipback.errors import DataError

_HINT = "save it with np.savez(path, images=uint8 (N,H,W[,C]), labels=int (N,), classes=np.array([...str]))"


def _to_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    """Valid pixels (see labels.pixel_problems) as uint8."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        return np.rint(images * 255.0).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.uint8)
    raise DataError(f"images in {path} have unsupported dtype {images.dtype}", hint=_HINT)


def load_npz(path: Path, split: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"images", "labels"} - set(z.files)
            if missing:
                raise DataError(f"{path} lacks {', '.join(sorted(missing))} (has: {', '.join(z.files) or 'nothing'})",
                                hint=_HINT)
            images, labels = z["images"], z["labels"]
            classes = z["classes"] if "classes" in z.files else None
    except DataError:
        raise
    except ValueError as e:  # object arrays need pickle, which we refuse
        raise DataError(f"cannot read {path}: {e}", hint=_HINT) from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}", hint="is it a complete .npz file?") from None

    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"images in {path} must be (N,H,W) or (N,H,W,C) with C 1 or 3; got {images.shape}",
                        hint=_HINT)
    if len(images) == 0:
        raise DataError(f"{path} holds no images")
    if not (np.issubdtype(images.dtype, np.number) and images.dtype.kind in "uif"):
        raise DataError(f"images in {path} have unsupported dtype {images.dtype}", hint=_HINT)
    if labels.ndim != 1:
        raise DataError(f"labels in {path} must be 1-D; got shape {labels.shape}", hint=_HINT)
    if len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} labels in {path}", hint=_HINT)
    labels, missing = integer_labels(labels, f" in {path}")
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise DataError(f"classes in {path} must be a 1-D array of strings", hint=_HINT)
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
    names = [f"{split}/{i:06d}" for i in range(len(images))]
    # One bad image or label costs only itself: it is skipped with its reason.
    problems = {**pixel_problems(images), **label_problems(labels, missing, None if classes is None else len(classes))}
    keep, skipped = drop(problems, len(images), names, f" in {path}")
    if len(keep) < len(images):
        images, labels, names = images[keep], labels[keep], [names[i] for i in keep]
    if classes is None:
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    return Dataset(
        np.ascontiguousarray(_to_uint8(images, path)),
        labels,
        classes,
        names,
        skipped=skipped,
        source=str(path),
        fingerprint=fingerprint.of_files([path], extra="npz"),
    )
