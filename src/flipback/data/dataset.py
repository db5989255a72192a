"""The in-memory (or memory-mapped) data set every other part of flipback reads."""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from flipback.errors import DataError


@dataclass(frozen=True)
class SkippedItem:
    """A file that was left out of the data set, and why."""

    name: str
    reason: str


def release_mapped_pages(images: np.ndarray) -> None:
    """Pages of a read-only memory-mapped cache count in this process's resident memory once
    read: a pass over 50,000 CIFAR images would hold 150 MB, ImageNet-sized ones gigabytes.
    Give them back after each batch (the OS page cache keeps them, so reading again stays
    cheap), so that resident memory is one batch whatever the data set's size."""
    mm = getattr(images, "_mmap", None)
    # Shared maps only: on a private copy-on-write map ("c") this would drop changes.
    if mm is None or getattr(images, "mode", None) not in ("r", "r+", "w+") or not hasattr(mm, "madvise"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # not supported here: only memory is at stake
        pass


class Dataset:
    """Images (N,H,W,C) uint8 with int64 labels, class names and a stable name per image.

    `images` may be an np.memmap of the cache file, so read it through `batches()`
    or index it; never assume it is writable.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        names: Sequence[str],
        *,
        skipped: Sequence[SkippedItem] = (),
        source: str = "",
        fingerprint: str = "",
    ):
        labels = np.asarray(labels)
        where = f" in {source}" if source else ""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(
                f"images{where} must be uint8 with shape (N,H,W,C), C 1 or 3; "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise DataError(f"labels{where} must be a 1-D array of integers; got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels{where}",
                            hint="every image needs exactly one label")
        if len(names) != len(images):
            raise DataError(f"{len(images)} images but {len(names)} names{where}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(
                f"labels{where} must be in 0..{len(classes) - 1} for {len(classes)} classes; "
                f"found {labels.min()}..{labels.max()}",
                hint="list every class, in the model's order",
            )
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.classes = [str(c) for c in classes]
        self.names = list(names)
        self.skipped = list(skipped)
        self.source = source
        self.fingerprint = fingerprint

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        h, w, c = self.shape
        return (f"Dataset({len(self)} images {h}x{w}x{c}, {self.num_classes} classes, "
                f"{len(self.skipped)} skipped, source={self.source!r})")

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean mask has shape {idx.shape}, expected ({len(self)},)")
            return np.flatnonzero(idx).astype(np.int64)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise IndexError("indices must be a 1-D sequence of integers")
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"indices must be in 0..{len(self) - 1}; found {idx.min()}..{idx.max()}")
        return idx.astype(np.int64, copy=False)

    def batches(self, batch_size: int, indices=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (idx, images) with images a fresh NHWC uint8 copy, in the order of `indices`."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        idx = np.arange(len(self), dtype=np.int64) if indices is None else self._indices(indices)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            # Fancy indexing copies, and turns a memmap slice into a plain array.
            batch = np.asarray(self.images[chunk])
            release_mapped_pages(self.images)
            yield chunk, batch

    def subset(self, indices) -> "Dataset":
        """A new Dataset of the given images (materialised), same classes and names."""
        idx = self._indices(indices)
        digest = hashlib.sha256(self.fingerprint.encode() + idx.tobytes()).hexdigest()[:16]
        return Dataset(
            np.asarray(self.images[idx]),
            self.labels[idx],
            self.classes,
            [self.names[i] for i in idx],
            skipped=self.skipped,
            source=self.source,
            fingerprint=digest,
        )
