"""load_dataset: pick the format from the path and hand over to its loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from flipback.data import idx
from flipback.data.dataset import Dataset
from flipback.data.fingerprint import of_json
from flipback.data.imagefolder import load_image_folder
from flipback.data.npz import load_npz
from flipback.errors import DataError

SPLITS = ("train", "test")
_FORMATS = "an image folder (<dir>/<class>/*.png), a .npz file, or an MNIST/Fashion-MNIST IDX folder or images file"
# A folder holding only these sub-folders is a parent of splits, not of classes.
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}


def load_dataset(path: str | os.PathLike, *, split: str = "test", cache_dir=None,
                 workers: int | None = None, progress: bool = False,
                 size: tuple[int, int] | None = None) -> Dataset:
    """Load an image folder, IDX folder/file or .npz as a Dataset (see package docs)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", hint="use 'train' or 'test'")
    size = _check_size(size)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data set not found: {path}", hint=f"give {_FORMATS}")
    p = p.resolve()
    if p.is_file():
        if p.suffix.lower() == ".npz":
            ds = load_npz(p, split)
        elif idx.is_images_file(p):
            ds = idx.load_idx(p)
        elif idx.is_labels_file(p):
            raise DataError(f"{p.name} is a labels file", hint="give the images file or the folder holding both")
        else:
            raise DataError(f"unknown data set format: {p.name}", hint=f"give {_FORMATS}")
        return _resized(ds, size)
    if not p.is_dir():
        raise DataError(f"{p} is neither a file nor a folder", hint=f"give {_FORMATS}")
    images_file = idx.find_images(p, split)
    if images_file is not None:
        ds = _resized(idx.load_idx(images_file), size)
        ds.source = str(p)
        return ds
    return load_image_folder(_split_folder(p, split), cache_dir=cache_dir, workers=workers,
                             progress=progress, size=size, base=p)


def _split_folder(p: Path, split: str) -> Path:
    """<p>/test (or val) when p holds only split folders like train/ and test/; else p."""
    subdirs = {e.name.lower(): e.name for e in os.scandir(p) if e.is_dir() and not e.name.startswith(".")}
    known = {n for names in _SPLIT_DIRS.values() for n in names}
    if not subdirs or not set(subdirs) <= known:
        return p
    for name in _SPLIT_DIRS[split]:
        if name in subdirs:
            return p / subdirs[name]
    raise DataError(f"no {split} split in {p} (found: {', '.join(sorted(subdirs.values()))})",
                    hint="pick another split, or give the split folder itself")


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise DataError(f"size must be (width, height); got {size!r}") from None
    if w < 1 or h < 1:
        raise DataError(f"size must be positive; got {w}x{h}")
    return w, h


def _resized(ds: Dataset, size: tuple[int, int] | None) -> Dataset:
    """Array formats: resize every image (PIL bilinear) when a different size is asked for."""
    h, w, c = ds.shape
    if size is None or size == (w, h):
        return ds
    out = np.empty((len(ds), size[1], size[0], c), dtype=np.uint8)
    for i, img in enumerate(ds.images):
        im = Image.fromarray(img[..., 0] if c == 1 else img).resize(size, Image.BILINEAR)
        out[i] = np.asarray(im).reshape(size[1], size[0], c)
    fp = of_json({"parent": ds.fingerprint, "size": list(size)})
    return Dataset(out, ds.labels, ds.classes, ds.names, skipped=ds.skipped, source=ds.source, fingerprint=fp)
