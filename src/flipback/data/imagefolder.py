"""ImageFolder loading: <root>/<class>/**/*.png|jpg|jpeg|bmp|webp, decoded in parallel into the cache.

Two passes: headers first (cheap) to pick the common size and colour mode and to know
N, then a full decode written chunk by chunk into a memory-mapped .npy, so peak memory
is one chunk whatever the folder size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from flipback.data import cache, fingerprint
from flipback.data.dataset import Dataset, SkippedItem, release_mapped_pages
from flipback.data.preprocess import Preprocess
from flipback.data.progress import progress_bar
from flipback.errors import DataError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "La"}
# More than 8 bits per value: converting would clip or rescale silently, so these are skipped.
DEEP_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
CHUNK = 1024


@dataclass(slots=True)  # one per file, 50,000 of them in a big folder: keep them small
class _File:
    name: str  # relative posix path, e.g. "cat/0001.jpg"
    path: str
    label: int
    size: int
    mtime_ns: int


def find_classes(root: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .DS_Store dirs) are never classes.
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _display(name: str) -> str:
    """The name shown for a file. Bytes that are not UTF-8 show as U+FFFD, so that every name
    can be written to JSON, HTML and the terminal (the file itself is opened by its path)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _rel(path: Path, base: Path) -> str:
    return _display(path.relative_to(base).as_posix())


def list_files(root: Path, classes: list[str], base: Path) -> tuple[list[_File], list[SkippedItem]]:
    """The image files of each class, and every other entry met, with the reason it is left out:
    hidden, not an image, not a regular file, outside the class folders, or a folder reached a
    second time through a symbolic link (a loop, or the same images under two labels)."""
    files: list[_File] = []
    left_out: list[SkippedItem] = []
    seen_dirs: set[tuple[int, int]] = set()
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        name, is_dir = _rel(Path(e.path), base), e.is_dir()
        if e.name.startswith("."):
            left_out.append(SkippedItem(name + "/" if is_dir else name, "hidden folder" if is_dir else "hidden file"))
        elif not is_dir:
            left_out.append(SkippedItem(name, "not in a class folder: images go in <class>/"))
    for label, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            here = Path(dirpath)
            st = os.stat(here)
            if (st.st_dev, st.st_ino) in seen_dirs:  # never walk a folder twice
                left_out.append(SkippedItem(_rel(here, base) + "/", "folder already read: a symbolic link "
                                            "leads back to it"))
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            for d in sorted(d for d in dirnames if d.startswith(".")):
                left_out.append(SkippedItem(_rel(here / d, base) + "/", "hidden folder"))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            prefix = _rel(here, base)
            for fn in filenames:
                p = os.path.join(dirpath, fn)
                name = _display(f"{prefix}/{fn}" if prefix != "." else fn)
                ext = os.path.splitext(fn)[1].lower()
                if fn.startswith("."):
                    left_out.append(SkippedItem(name, "hidden file"))
                    continue
                if ext not in IMAGE_EXTS:
                    left_out.append(SkippedItem(name, f"not an image file: extension '{ext}'"))
                    continue
                try:
                    st = os.stat(p)
                    size, mtime = st.st_size, st.st_mtime_ns
                    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
                        left_out.append(SkippedItem(name, "not a regular file"))
                        continue
                except OSError:  # broken symlink or a loop of them: reported as skipped by the probe
                    size, mtime = -1, 0
                found.append(_File(name, p, label, size, mtime))
        if not found:
            left_out.append(SkippedItem(f"{cls}/", "empty class folder: kept as a class, with no images"))
        files.extend(sorted(found, key=lambda f: f.name))
    return files, left_out


def _open_error(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "cannot decode image: not a recognised image format"
    if isinstance(e, OSError) and e.errno is not None:  # Pillow's own OSErrors have no errno
        return f"cannot read file: {e.strerror or e}"
    return f"cannot decode image: {e}"


def _probe(f: _File) -> tuple[tuple[int, int], bool] | str:
    """((W, H), is_gray) from the header, or the reason the file is skipped."""
    if f.size == 0:
        return "empty file"
    try:
        with Image.open(f.path) as im:
            if getattr(im, "n_frames", 1) > 1:
                return f"animated image: {im.n_frames} frames"
            if im.mode in DEEP_MODES:
                return f"unsupported mode: {im.mode} has more than 8 bits per value; save it as 8-bit"
            return im.size, im.mode in GRAY_MODES
    except Exception as e:  # any decoder failure is a per-file problem, never fatal
        return _open_error(e)


def _decode_one(path: Path, size: tuple[int, int], mode: str, transform: Preprocess | None = None) -> np.ndarray | str:
    """Fully decode one image to (H, W, C) uint8, or the reason it is skipped. With the model's
    `transform`, every image is resized and center-cropped to its input size."""
    try:
        with Image.open(path) as im:
            im.load()  # forces the whole decode, so truncation surfaces here
            if im.mode == "P":
                im = im.convert("RGBA")  # palette transparency must go through RGBA
            if mode == "L" and im.mode not in GRAY_MODES:
                # A colour image in a grayscale data set: kept only if it holds no colour.
                arr = np.asarray(im.convert("RGB"))
                if not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()):
                    return "wrong channels: a colour image in a grayscale data set"
                im = Image.fromarray(arr[..., 0])
            if im.mode != mode:
                im = im.convert(mode)
            if transform is not None:
                im = transform(im)
            elif im.size != size:
                im = im.resize(size, Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        return _open_error(e)
    return arr[..., None] if arr.ndim == 2 else arr


def _folder_fingerprint(root: Path, classes: list[str], files: list[_File], size, transform=None) -> str:
    # Hashed file by file: a JSON of the whole listing would be one more copy of it in memory.
    key = {"kind": "imagefolder", "cache_version": cache.CACHE_VERSION, "classes": classes,
           "size": list(size) if size else None}
    if transform is not None:  # only then, so that entries made without one keep their keys
        key["preprocess"] = transform.key()
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for f in files:
        h.update(json.dumps([f.name, f.size, f.mtime_ns]).encode())
    return fingerprint.digest(h)


def load_image_folder(root: Path, *, cache_dir=None, workers: int | None = None,
                      progress: bool = False, size: tuple[int, int] | None = None,
                      base: Path | None = None, transform: Preprocess | None = None) -> Dataset:
    """Classes are root's sub-folders; names are relative to `base` (default root), the source.
    `transform` (the model's eval transform) replaces `size`: images of any size are accepted."""
    base = base or root
    classes = find_classes(root)
    if not classes:
        has_images = any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir() if p.is_file())
        raise DataError(
            f"no class sub-folders in {root}" + (" (the images are directly in it)" if has_images else ""),
            hint=f"put the images in one folder per class: {root}/<class>/<image>.png",
        )
    files, left_out = list_files(root, classes, base)
    if not files:
        raise DataError(f"no images in {root}",
                        hint=f"expected {root}/<class>/*.png (or .jpg, .jpeg, .bmp, .webp, .gif, .tif)")
    fp = _folder_fingerprint(root, classes, files, size, transform)
    cache_root = cache.resolve_cache_dir(cache_dir)
    hit = cache.read_entry(cache_root, fp)
    if hit is None:
        hit = _build(root, classes, files, fp, cache_root, workers, progress, size, transform)
    # Entries that are not image files are listed afresh on every load, so they need no cache.
    skipped = sorted(left_out + hit["skipped"], key=lambda s: s.name)
    return Dataset(hit["images"], hit["labels"], hit["classes"], hit["names"],
                   skipped=skipped, source=str(base), fingerprint=fp)


def _build(root, classes, files, fp, cache_root, workers, progress, size, transform=None) -> dict:
    workers = max(1, workers or min(8, os.cpu_count() or 1))
    try:
        staging, keep = cache.Staging(cache_root, fp), True
    except OSError:
        # Cache folder not writable: decode into a temp folder, map it, then unlink it.
        try:
            staging, keep = cache.Staging(Path(tempfile.mkdtemp(prefix="flipback-")), fp), False
        except OSError as e:
            raise DataError(f"cannot write the image cache to {cache_root} or a temp folder: {e}",
                            hint="set FLIPBACK_CACHE to a writable folder") from None
    try:
        with ThreadPoolExecutor(workers) as pool, progress_bar(progress) as bar:
            labels, names, skipped, images = _decode_all(root, files, size, staging, pool, bar, transform)
            images.flush()
            del images  # close the writable map before renaming its folder
        if keep:
            staging.commit(labels, classes, names, skipped)
            hit = cache.read_entry(cache_root, fp)
            if hit is None:
                raise DataError(f"the image cache in {cache_root} could not be read back",
                                hint="set FLIPBACK_CACHE to another folder")
            return hit
        out = {"images": np.load(staging.dir / "images.npy", mmap_mode="r"),
               "labels": labels, "classes": classes, "names": names, "skipped": skipped}
        shutil.rmtree(staging.root, ignore_errors=True)  # the open map keeps the data alive
        return out
    except BaseException:
        staging.discard()
        if not keep:
            shutil.rmtree(staging.root, ignore_errors=True)
        raise


def _decode_all(root, files, size, staging, pool, bar, transform=None):
    reasons: dict[int, str] = {}
    probes: list = []
    task = bar.add("reading headers", len(files))
    for start in range(0, len(files), CHUNK):
        for res in pool.map(_probe, files[start:start + CHUNK]):
            probes.append(res)
            bar.advance(task)
    ok = [i for i, r in enumerate(probes) if not isinstance(r, str)]
    reasons.update({i: r for i, r in enumerate(probes) if isinstance(r, str)})
    if not ok:
        raise _nothing_readable(root, files, reasons)

    if transform is not None:
        size = (transform.width, transform.height)
    target = size or Counter(probes[i][0] for i in ok).most_common(1)[0][0]
    if size is None:
        w0, h0 = target
        for i in ok:
            (w, h), _ = probes[i]
            if (w, h) != target:
                reasons[i] = f"wrong size: {w}x{h}, expected {w0}x{h0} (or pass a size to resize)"
        ok = [i for i in ok if i not in reasons]
    # The channels most images have (colour on a tie). Gray images join a colour set (exactly);
    # colour images in a gray set are kept only if they hold no colour (see _decode_one).
    gray = sum(1 for i in ok if probes[i][1])
    mode = "L" if gray > len(ok) - gray else "RGB"
    if transform is not None and transform.channels == 3:  # a colour model: gray images join exactly
        mode = "RGB"
    channels = 1 if mode == "L" else 3
    w0, h0 = target

    images = staging.open_images((len(ok), h0, w0, channels))
    kept: list[int] = []
    task = bar.add("decoding", len(ok))
    for start in range(0, len(ok), CHUNK):
        chunk = ok[start:start + CHUNK]
        for i, arr in zip(chunk, pool.map(lambda j: _decode_one(files[j].path, target, mode, transform), chunk)):
            if isinstance(arr, str):
                reasons[i] = arr
            else:
                images[len(kept)] = arr
                kept.append(i)
            bar.advance(task)
        images.flush()
        release_mapped_pages(images)  # written pages are in the file now: resident memory stays one chunk
    if not kept:
        raise _nothing_readable(root, files, reasons)
    if len(kept) < len(ok):
        images = _shrink(staging, images, len(kept))

    labels = np.array([files[i].label for i in kept], dtype=np.int64)
    names = [files[i].name for i in kept]
    skipped = [SkippedItem(files[i].name, reasons[i]) for i in sorted(reasons)]
    return labels, names, skipped, images


def _shrink(staging, images: np.memmap, n: int) -> np.memmap:
    """Copy the first n rows into a right-sized .npy (files that failed only at full decode)."""
    small = staging.open_images((n,) + images.shape[1:], name="images.tmp.npy")
    for start in range(0, n, CHUNK):
        small[start:start + CHUNK] = images[start:min(n, start + CHUNK)]
    small.flush()
    del images
    os.replace(staging.dir / "images.tmp.npy", staging.dir / "images.npy")
    return small


def _nothing_readable(root: Path, files: list[_File], reasons: dict[int, str]) -> DataError:
    examples = "; ".join(f"{files[i].name}: {r}" for i, r in list(sorted(reasons.items()))[:3])
    return DataError(f"none of the {len(files)} image files in {root} could be read ({examples})",
                     hint="check that the files are valid images")
