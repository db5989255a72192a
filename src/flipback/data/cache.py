"""On-disk cache of decoded image folders: images.npy (memory-mapped), labels.npy, meta.json.

An entry is built in a hidden temp folder and renamed into place in one step, so a
killed decode never leaves a half-written entry under the fingerprint's name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from flipback.data.dataset import SkippedItem
from flipback.errors import DataError

CACHE_VERSION = 2  # 2: channels by majority, 16-bit and animated images skipped


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FLIPBACK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flipback" / "data"


def read_entry(root: Path, fp: str) -> dict | None:
    """The cached arrays for fingerprint `fp`, or None if absent or not trustworthy."""
    entry = root / fp
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fp:
            return None
        images = np.load(entry / "images.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy")
        n = len(meta["names"])
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n or labels.shape != (n,):
            return None
        return {
            "images": images,
            "labels": labels,
            "classes": meta["classes"],
            "names": meta["names"],
            "skipped": [SkippedItem(s["name"], s["reason"]) for s in meta["skipped"]],
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Staging:
    """A temp folder that becomes cache entry `root/fp` on commit()."""

    def __init__(self, root: Path, fp: str):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.fp = root, fp
        self.dir = Path(tempfile.mkdtemp(prefix=f".tmp-{fp}-", dir=root))

    def open_images(self, shape: tuple[int, ...], name: str = "images.npy") -> np.memmap:
        path = self.dir / name
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        # Reserve the space now: writing into a sparse memmap on a full disk kills the
        # process with SIGBUS instead of raising.
        if hasattr(os, "posix_fallocate"):
            with open(path, "r+b") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        self.discard()
                        raise DataError(f"cannot reserve {arr.nbytes / 1e6:.0f} MB for the image cache in {self.root}: {e.strerror}",
                                        hint="free some space or set FLIPBACK_CACHE to another folder") from None
        return arr

    def commit(self, labels: np.ndarray, classes: list[str], names: list[str],
               skipped: list[SkippedItem]) -> Path:
        np.save(self.dir / "labels.npy", labels)
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": self.fp,
            "classes": classes,
            "names": names,
            "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
        }
        (self.dir / "meta.json").write_text(json.dumps(meta))
        final = self.root / self.fp
        try:
            os.rename(self.dir, final)
        except OSError:
            # Another process won the race (keep its entry) or a stale one is in the way.
            if read_entry(self.root, self.fp) is not None:
                self.discard()
                return final
            shutil.rmtree(final, ignore_errors=True)
            os.rename(self.dir, final)
        return final

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
