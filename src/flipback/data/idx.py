"""MNIST / Fashion-MNIST IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz])."""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from flipback.data import fingerprint
from flipback.data.dataset import Dataset
from flipback.data.labels import drop, label_problems
from flipback.errors import DataError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Also accepts the "train-images.idx3-ubyte" spelling some mirrors use.
_IMAGES_RE = re.compile(r"^(train|t10k)-images[-.]idx3-ubyte(\.gz)?$", re.IGNORECASE)
_LABELS_RE = re.compile(r"^(train|t10k)-labels[-.]idx1-ubyte(\.gz)?$", re.IGNORECASE)
_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_dir() -> Path | None:
    """Debian's Fashion-MNIST folder, if the package is installed."""
    return DEBIAN_FASHION_MNIST if DEBIAN_FASHION_MNIST.is_dir() else None


def is_images_file(path: Path) -> bool:
    return bool(_IMAGES_RE.match(path.name))


def is_labels_file(path: Path) -> bool:
    return bool(_LABELS_RE.match(path.name))


def find_images(folder: Path, split: str) -> Path | None:
    """The images file of `split` in folder; None if the folder holds no IDX images at all."""
    found = {m.group(1).lower(): p for p in folder.iterdir() if p.is_file() and (m := _IMAGES_RE.match(p.name))}
    if not found:
        return None
    if _PREFIX[split] not in found:
        have = ", ".join(sorted("test" if k == "t10k" else k for k in found))
        raise DataError(f"no {split} split in {folder} (found: {have})", hint=f"use split={have.split(', ')[0]!r}")
    return found[_PREFIX[split]]


def _labels_for(images: Path) -> Path:
    base = re.sub(r"\.gz$", "", images.name, flags=re.IGNORECASE)
    base = re.sub("images", "labels", base, flags=re.IGNORECASE)
    base = re.sub("idx3", "idx1", base, flags=re.IGNORECASE)
    for cand in (images.parent / base, images.parent / (base + ".gz")):
        if cand.is_file():
            return cand
    raise DataError(f"no labels file next to {images}", hint=f"expected {images.parent / base}[.gz]")


def _parse(path: Path, raw: bytes, ndim: int) -> np.ndarray:
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is not a valid gzip file: {e}") from None
    if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: only unsigned-byte IDX data is supported (type code {raw[2]:#04x})")
    if raw[3] != ndim:
        raise DataError(f"{path}: expected {ndim} dimensions, the file has {raw[3]}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated or padded: header says {dims}, "
                        f"{data.size} values follow")
    return data.reshape(dims)


def load_idx(images_path: Path) -> Dataset:
    labels_path = _labels_for(images_path)
    raw_images, raw_labels = images_path.read_bytes(), labels_path.read_bytes()
    h = hashlib.sha256(b"idx")
    h.update(raw_images)
    h.update(raw_labels)
    images = _parse(images_path, raw_images, 3)
    labels = _parse(labels_path, raw_labels, 1)
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images in {images_path.name} but {len(labels)} labels in {labels_path.name}",
                        hint="the images and labels files must come from the same split")
    fashion = "fashion" in (images_path.name + "/" + images_path.parent.name).lower()
    classes = FASHION_MNIST_CLASSES if fashion else DIGIT_CLASSES
    split = "test" if images_path.name.lower().startswith("t10k") else "train"
    labels = labels.astype(np.int64)
    names = [f"{split}/{i:06d}" for i in range(len(images))]
    keep, skipped = drop(label_problems(labels, np.zeros(len(labels), bool), len(classes)), len(images), names,
                         f" in {images_path.name}")
    if len(keep) < len(images):  # labels outside the class list: those images are skipped
        images, labels, names = images[keep], labels[keep], [names[i] for i in keep]
    return Dataset(
        images[..., None],
        labels,
        classes,
        names,
        skipped=skipped,
        source=str(images_path),
        fingerprint=fingerprint.digest(h),
    )
