"""load_dataset: pick the format from the path and hand over to its loader."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from flipback.data import cache, idx
from flipback.data.dataset import Dataset, release_mapped_pages
from flipback.data.fingerprint import of_json
from flipback.data.imagefolder import load_image_folder
from flipback.data.npz import load_npz
from flipback.data.preprocess import Preprocess
from flipback.errors import DataError

SPLITS = ("train", "test")
_FORMATS = "an image folder (<dir>/<class>/*.png), a .npz file, or an MNIST/Fashion-MNIST IDX folder or images file"
# A folder holding only these sub-folders is a parent of splits, not of classes.
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}
# Names that mark a folder or file as held-out (test or validation) data, or as training data.
_HELD_OUT_NAMES = {"test", "testing", "t10k", "val", "valid", "validation"}
_TRAIN_NAMES = {"train", "training"}


def load_dataset(path: str | os.PathLike, *, split: str = "test", cache_dir=None,
                 workers: int | None = None, progress: bool = False,
                 size: tuple[int, int] | None = None, transform: Preprocess | None = None) -> Dataset:
    """Load an image folder, IDX folder/file or .npz as a Dataset (see package docs).

    `transform`: the model's eval transform (resize, center crop, channels), applied once here,
    so that images of any size and aspect ratio come out at the model's input size; it replaces
    `size`. Without one, a folder keeps its most common size and skips the others."""
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
        return _transformed(ds, transform, cache_dir) if transform is not None else _resized(ds, size)
    if not p.is_dir():
        raise DataError(f"{p} is neither a file nor a folder", hint=f"give {_FORMATS}")
    images_file = idx.find_images(p, split)
    if images_file is not None:
        ds = idx.load_idx(images_file)
        ds = _transformed(ds, transform, cache_dir) if transform is not None else _resized(ds, size)
        ds.source = str(p)
        return ds
    return load_image_folder(_split_folder(p, split), cache_dir=cache_dir, workers=workers,
                             progress=progress, size=size, base=p, transform=transform)


def split_of(path: str | os.PathLike, split: str = "test") -> tuple[str, str]:
    """Which split `load_dataset(path, split=split)` reads: ("train" | "test" | "unknown", why).

    "test" covers held-out data, validation included. It is decided as the loader decides:
    by `split` for IDX folders and folders of train/ and test/ (or val/) splits; by the name
    of an IDX images file (train-* or t10k-*); otherwise by names in the resolved path, the
    nearest first: the file's or folder's own name (a word of it, as in `cifar10_test.npz`
    or `cifar10-test`), then each folder above it (the whole name, as in `.../test/x`).
    Raises DataError where load_dataset would (missing path, no such split)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", hint="use 'train' or 'test'")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data set not found: {path}", hint=f"give {_FORMATS}")
    p = p.resolve()
    if p.is_file() and idx.is_images_file(p):
        return ("test" if p.name.lower().startswith("t10k") else "train"), f"the IDX file {p.name}"
    if p.is_dir():
        images_file = idx.find_images(p, split)
        if images_file is not None:
            return split, f"split {split!r}: {images_file.name}"
        chosen = _split_folder(p, split)
        if chosen != p:
            return split, f"split {split!r}: {chosen.name}/"
    words = set(re.split(r"[^a-z0-9]+", (p.stem if p.is_file() else p.name).lower()))
    for kind, names in (("test", _HELD_OUT_NAMES), ("train", _TRAIN_NAMES)):
        if words & names:
            return kind, f"its name {p.name!r}"
    for parent in p.parents:
        name = parent.name.lower()
        if name in _HELD_OUT_NAMES:
            return "test", f"the folder {parent}"
        if name in _TRAIN_NAMES:
            return "train", f"the folder {parent}"
    return "unknown", f"no train or test name in {p}"


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


def _transformed(ds: Dataset, transform: Preprocess, cache_dir=None) -> Dataset:
    """Array formats: the model's eval transform on every image (unchanged when it is a no-op),
    written chunk by chunk into a memory-mapped cache entry, as image folders are: 10,000
    images at 224 px are 1.5 GB, which must not sit in memory."""
    h, w, c = ds.shape
    # Gray images become RGB for a colour model (exact); colour ones are never made gray (lossy):
    # the model's input check then says what is wrong.
    channels = 3 if transform.channels == 3 else c
    if transform.is_identity(w, h) and channels == c:
        return ds
    fp = of_json({"parent": ds.fingerprint, "preprocess": transform.key(), "cache_version": cache.CACHE_VERSION})
    root = cache.resolve_cache_dir(cache_dir)
    hit = cache.read_entry(root, fp)
    if hit is None:
        try:
            staging = cache.Staging(root, fp)
        except OSError as e:
            raise DataError(f"cannot write the image cache to {root}: {e}",
                            hint="set FLIPBACK_CACHE to a writable folder") from None
        try:
            out = staging.open_images((len(ds), transform.height, transform.width, channels))
            for i, img in enumerate(ds.images):
                im = transform(Image.fromarray(img[..., 0] if c == 1 else img))
                im = im.convert("L" if channels == 1 else "RGB")
                out[i] = np.asarray(im).reshape(transform.height, transform.width, channels)
                if i % 1024 == 1023:
                    out.flush()
                    release_mapped_pages(out)
            out.flush()
            del out  # close the writable map before renaming its folder
            staging.commit(ds.labels, ds.classes, ds.names, ds.skipped)
        except BaseException:
            staging.discard()
            raise
        hit = cache.read_entry(root, fp)
        if hit is None:
            raise DataError(f"the image cache in {root} could not be read back", hint="set FLIPBACK_CACHE to another folder")
    return Dataset(hit["images"], hit["labels"], hit["classes"], hit["names"], skipped=ds.skipped,
                   source=ds.source, fingerprint=fp)
