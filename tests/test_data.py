"""Data loading: image folders, IDX, npz, the decode cache, and bad input."""

from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flipback.data import (FASHION_MNIST_CLASSES, Dataset, SkippedItem, fashion_mnist_dir,
                           load_dataset)
from flipback.data import imagefolder
from flipback.errors import DataError

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPBACK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def save(path: Path, arr: np.ndarray, fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def rgb(h=6, w=8):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """3 classes (created out of order), PNGs with known pixels plus one JPEG."""
    root = tmp_path / "imgs"
    pixels = {}
    for cls in ["dog", "bird", "cat"]:
        for i in range(2):
            name = f"{cls}/{i:02d}.png"
            pixels[name] = save(root / name, rgb())
    save(root / "cat" / "sub" / "x.JPG", rgb())  # nested, upper-case extension
    (root / "cat" / "notes.txt").write_text("not an image")  # not loaded; recorded as left out
    return root, pixels


def test_imagefolder_classes_labels_pixels(folder):
    root, pixels = folder
    ds = load_dataset(root)
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.names == ["bird/00.png", "bird/01.png", "cat/00.png", "cat/01.png", "cat/sub/x.JPG",
                        "dog/00.png", "dog/01.png"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert ds.shape == (6, 8, 3) and len(ds) == 7 and ds.num_classes == 3
    assert ds.images.dtype == np.uint8
    assert ds.skipped == [SkippedItem("cat/notes.txt", "not an image file: extension '.txt'")]
    for i, name in enumerate(ds.names):
        if name.endswith(".png"):
            np.testing.assert_array_equal(ds.images[i], pixels[name])
    assert ds.source == str(root.resolve())
    assert len(ds.fingerprint) == 16


def test_bad_files_are_skipped_with_reasons(folder):
    root, _ = folder
    good = png_bytes(rgb(24, 32))
    save(root / "bird" / "big.png", rgb(24, 32))  # not the common size
    (root / "bird" / "corrupt.png").write_bytes(good[:40] + bytes(RNG.integers(0, 256, 500, dtype=np.uint8)))
    (root / "cat" / "truncated.png").write_bytes(png_bytes(rgb())[:-60])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("hello, I am not a JPEG")
    ds = load_dataset(root)
    reasons = {s.name: s.reason for s in ds.skipped}
    assert set(reasons) == {"bird/big.png", "bird/corrupt.png", "cat/truncated.png", "dog/empty.png",
                            "dog/text.jpg", "cat/notes.txt"}
    assert reasons["bird/big.png"] == "wrong size: 32x24, expected 8x6 (or pass a size to resize)"
    assert reasons["dog/empty.png"] == "empty file"
    for name in ("bird/corrupt.png", "cat/truncated.png", "dog/text.jpg"):
        assert reasons[name].startswith("cannot decode image: "), reasons[name]
    assert all(isinstance(s, SkippedItem) for s in ds.skipped)
    assert len(ds) == 7 and ds.shape == (6, 8, 3)  # the good ones all load
    # A truncated file fails only at full decode: the cache must still hold exactly the kept rows.
    again = load_dataset(root)
    assert len(again) == 7 and again.skipped == ds.skipped


def test_size_resizes_instead_of_skipping(folder):
    root, _ = folder
    save(root / "bird" / "big.png", rgb(24, 32))
    ds = load_dataset(root, size=(4, 3))
    assert ds.shape == (3, 4, 3) and len(ds) == 8 and [s.name for s in ds.skipped] == ["cat/notes.txt"]


def test_grayscale_folder_has_one_channel(tmp_path):
    for cls in ["a", "b"]:
        save(tmp_path / "g" / cls / "1.png", RNG.integers(0, 256, (5, 5), dtype=np.uint8))
    ds = load_dataset(tmp_path / "g")
    assert ds.shape == (5, 5, 1)
    # A colour image among gray ones is skipped (a gray one in RGB would be kept); on a tie, colour wins.
    save(tmp_path / "g" / "a" / "2.png", rgb(5, 5))
    ds = load_dataset(tmp_path / "g")
    assert ds.shape == (5, 5, 1) and [s.reason for s in ds.skipped] == [
        "wrong channels: a colour image in a grayscale data set"]
    save(tmp_path / "g" / "b" / "2.png", rgb(5, 5))
    ds = load_dataset(tmp_path / "g")
    assert ds.shape == (5, 5, 3) and len(ds) == 4 and ds.skipped == []


def test_split_parent_folder(tmp_path):
    save(tmp_path / "d" / "train" / "a" / "1.png", rgb())
    save(tmp_path / "d" / "test" / "a" / "1.png", rgb())
    save(tmp_path / "d" / "test" / "b" / "1.png", rgb())
    ds = load_dataset(tmp_path / "d")
    assert ds.classes == ["a", "b"] and ds.names == ["test/a/1.png", "test/b/1.png"]
    assert len(load_dataset(tmp_path / "d", split="train")) == 1


def test_npz_round_trip(tmp_path):
    images = RNG.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "d.npz", images=images, labels=labels, classes=np.array(["x", "y", "z"]))
    ds = load_dataset(tmp_path / "d.npz")
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels.tolist() == labels.tolist() and ds.classes == ["x", "y", "z"]
    assert ds.names[3] == "test/000003"

    np.savez(tmp_path / "f.npz", images=images[..., 0] / 255.0, labels=labels)
    ds = load_dataset(tmp_path / "f.npz")
    assert ds.shape == (4, 4, 1) and ds.classes == ["0", "1", "2"]
    np.testing.assert_array_equal(ds.images[..., 0], images[..., 0])


@pytest.mark.parametrize("bad", [
    # (A label out of range or missing costs only its image: see tests/test_bad_input.py.)
    dict(labels=np.array([0, 1])),  # count mismatch
    dict(images=np.full((5, 4, 4), 2.0), labels=np.zeros(5, int)),  # every image: float outside [0, 1]
    dict(labels=np.zeros(5, int), classes=np.array(["a", None], dtype=object)),  # needs pickle
    dict(nolabels=np.zeros(5)),
])
def test_bad_npz_is_a_data_error(tmp_path, bad):
    arrays = {"images": np.zeros((5, 4, 4), np.uint8), **bad}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError):
        load_dataset(tmp_path / "bad.npz")


def test_whole_data_set_problems(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimgs" / "cls").mkdir(parents=True)
    save(tmp_path / "flat" / "1.png", rgb())
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "1.png").write_bytes(b"")
    cases = {"missing": "not found", "empty": "no class sub-folders", "noimgs": "no images",
             "flat": "no class sub-folders", "x.csv": "unknown data set format", "bad": "could be read"}
    for name, words in cases.items():
        with pytest.raises(DataError, match=words) as e:
            load_dataset(tmp_path / name)
        assert e.value.hint
    with pytest.raises(DataError):
        load_dataset(tmp_path / "flat", split="val")


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    ext = ".gz" if gz else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, *images.shape) + images.tobytes())
    with opener(folder / f"{prefix}-labels-idx1-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, len(labels)) + labels.astype(np.uint8).tobytes())


def test_idx_folder_and_file(tmp_path):
    test_imgs = RNG.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    train_imgs = RNG.integers(0, 256, (3, 5, 6), dtype=np.uint8)
    write_idx(tmp_path / "mnist", "t10k", test_imgs, np.arange(7) % 10)
    write_idx(tmp_path / "mnist", "train", train_imgs, np.array([9, 8, 7]), gz=False)
    ds = load_dataset(tmp_path / "mnist")
    assert ds.shape == (5, 6, 1) and len(ds) == 7 and ds.classes == [str(i) for i in range(10)]
    np.testing.assert_array_equal(ds.images[..., 0], test_imgs)
    assert ds.labels.tolist() == list(range(7)) and ds.names[0] == "test/000000"
    tr = load_dataset(tmp_path / "mnist", split="train")
    assert tr.labels.tolist() == [9, 8, 7] and tr.names[2] == "train/000002"
    assert tr.fingerprint != ds.fingerprint
    direct = load_dataset(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert direct.fingerprint == ds.fingerprint

    write_idx(tmp_path / "my-fashion", "t10k", test_imgs, np.zeros(7))
    assert load_dataset(tmp_path / "my-fashion").classes == FASHION_MNIST_CLASSES
    with pytest.raises(DataError, match="no train split"):
        load_dataset(tmp_path / "my-fashion", split="train")


def test_bad_idx_is_a_data_error(tmp_path):
    write_idx(tmp_path / "m", "t10k", np.zeros((4, 2, 2), np.uint8), np.zeros(3))
    with pytest.raises(DataError, match="4 images .* 3 labels"):
        load_dataset(tmp_path / "m")
    (tmp_path / "m" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(DataError, match="magic"):
        load_dataset(tmp_path / "m")


def test_second_load_uses_cache(folder, monkeypatch, _cache):
    root, _ = folder
    first = load_dataset(root)
    assert any(_cache.iterdir())

    def boom(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(imagefolder, "_decode_one", boom)
    second = load_dataset(root)
    assert isinstance(second.images, np.memmap)
    assert second.fingerprint == first.fingerprint and second.names == first.names
    np.testing.assert_array_equal(second.images, first.images)

    # A changed file changes the fingerprint, so the stale entry is not used.
    save(root / "dog" / "00.png", rgb())
    os.utime(root / "dog" / "00.png", ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(root)


def test_half_written_cache_is_not_trusted(folder, _cache):
    root, _ = folder
    ds = load_dataset(root)
    expected = np.array(ds.images)
    bad = _cache / ds.fingerprint / "images.npy"
    bad.unlink()  # a new inode: truncating the mapped file in place would crash the reader
    bad.write_bytes(b"garbage")
    again = load_dataset(root)
    np.testing.assert_array_equal(again.images, expected)
    assert [p.name for p in _cache.iterdir()] == [ds.fingerprint]  # no temp folders left behind


def test_batches_and_subset(folder):
    root, _ = folder
    ds = load_dataset(root, workers=1, progress=True)
    seen = list(ds.batches(3))
    assert [len(i) for i, _ in seen] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in seen]), np.arange(7))
    batch = np.concatenate([b for _, b in seen])
    np.testing.assert_array_equal(batch, ds.images)
    assert type(batch) is np.ndarray and batch.flags.writeable

    idx, imgs = next(ds.batches(10, indices=[5, 0]))
    assert idx.tolist() == [5, 0]
    np.testing.assert_array_equal(imgs, ds.images[[5, 0]])

    sub = ds.subset([6, 1])
    assert isinstance(sub, Dataset) and len(sub) == 2 and sub.classes == ds.classes
    assert sub.names == [ds.names[6], ds.names[1]] and sub.labels.tolist() == [2, 0]
    np.testing.assert_array_equal(sub.images, ds.images[[6, 1]])
    assert sub.fingerprint != ds.fingerprint
    with pytest.raises(IndexError):
        ds.subset([7])


@pytest.mark.skipif(fashion_mnist_dir() is None, reason="Debian's fashion-mnist package is not installed")
def test_debian_fashion_mnist():
    ds = load_dataset(fashion_mnist_dir(), split="test")
    assert len(ds) == 10000 and ds.shape == (28, 28, 1) and ds.num_classes == 10
    assert ds.classes == FASHION_MNIST_CLASSES
    assert np.bincount(ds.labels).tolist() == [1000] * 10


def test_unwritable_cache_falls_back_to_a_temp_map(folder, tmp_path):
    root, _ = folder
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ds = load_dataset(root, cache_dir=blocker / "cache")
    assert len(ds) == 7 and isinstance(ds.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(ds.images), load_dataset(root).images)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_batches_of_the_read_only_cache_become_tensors_of_their_own(dtype):
    """The memory-mapped cache is read-only; its tensors must not alias it (nor warn)."""
    import warnings

    from flipback.runs.errors import to_tensor

    cache = np.full((2, 3, 3, 1), 51, dtype=dtype)
    cache.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = to_tensor(cache)
    x += 1
    assert x.shape == (2, 1, 3, 3) and float(cache.sum()) == 51 * 18
