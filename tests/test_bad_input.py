"""A corpus of broken images, labels and folders, generated here (issue 6).

Every case ends in one of three ways, each checked: the entry is skipped and recorded with
its reason (Dataset.skipped, summary `skipped_by_reason`); a valid image in another form is
loaded (converted exactly); or a whole file that cannot be used is refused with one clear
error. None crashes a load or a run, and `flipback explain` prints one line counting the
skipped images by reason.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flipback.cli import app
from flipback.data import load_dataset
from flipback.errors import DataError
from flipback.targets.zoo import SmallCNN

RNG = np.random.default_rng(6)
SIDE = 28


def gray(side: int = SIDE) -> np.ndarray:
    return RNG.integers(0, 256, (side, side), dtype=np.uint8)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(arr=None) -> bytes:
    return encoded(Image.fromarray(gray() if arr is None else arr), "PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb() -> bytes:
    """A valid PNG header that claims 70000x70000 pixels (a decompression bomb)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 70000, 70000, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def _bad_crc() -> bytes:
    data = bytearray(png())
    data[data.index(b"IDAT") + 8] ^= 0xFF
    return bytes(data)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.txt", "hello")
    return buf.getvalue()


def _animated() -> bytes:
    frames = [Image.fromarray(gray()), Image.fromarray(gray())]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


def write(root: Path, name: str, data: bytes) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def symlink(root: Path, name: str, to: str) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(to, root / name)


# (kind, make(root), {entry name: expected}); expected is "load" or the start of the reason.
FOLDER_CASES = [
    ("random bytes named .png", lambda r: write(r, "a/random.png", RNG.bytes(600)),
     {"a/random.png": "cannot decode image"}),
    ("PNG signature, then garbage", lambda r: write(r, "a/sig.png", png()[:16] + RNG.bytes(300)),
     {"a/sig.png": "cannot decode image"}),
    ("truncated PNG", lambda r: write(r, "a/trunc.png", png()[:-80]), {"a/trunc.png": "cannot decode image"}),
    ("truncated JPEG", lambda r: write(r, "b/trunc.jpg", encoded(Image.fromarray(gray()), "JPEG")[:300]),
     {"b/trunc.jpg": "cannot decode image"}),
    ("truncated WebP", lambda r: write(r, "b/trunc.webp", encoded(Image.fromarray(gray()), "WEBP")[:40]),
     {"b/trunc.webp": "cannot decode image"}),
    ("PNG with a broken CRC", lambda r: write(r, "a/crc.png", _bad_crc()), {"a/crc.png": "cannot decode image"}),
    ("BMP header, then junk", lambda r: write(r, "b/junk.bmp", b"BM" + RNG.bytes(100)),
     {"b/junk.bmp": "cannot decode image"}),
    ("zero-byte .png", lambda r: write(r, "a/zero.png", b""), {"a/zero.png": "empty file"}),
    ("zero-byte .jpg", lambda r: write(r, "b/zero.jpg", b""), {"b/zero.jpg": "empty file"}),
    ("text file named .png", lambda r: write(r, "a/text.png", b"just some text\n"),
     {"a/text.png": "cannot decode image"}),
    ("HTML file named .jpg", lambda r: write(r, "b/page.jpg", b"<html><script>alert(1)</script></html>"),
     {"b/page.jpg": "cannot decode image"}),
    ("ZIP archive named .png", lambda r: write(r, "a/archive.png", _zip()), {"a/archive.png": "cannot decode image"}),
    ("PDF named .jpeg", lambda r: write(r, "b/doc.jpeg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"),
     {"b/doc.jpeg": "cannot decode image"}),
    ("decompression bomb (70000x70000 header)", lambda r: write(r, "a/bomb.png", _bomb()),
     {"a/bomb.png": "cannot decode image"}),
    ("dangling symbolic link", lambda r: symlink(r, "a/dangling.png", "nowhere.png"),
     {"a/dangling.png": "cannot read file"}),
    ("loop of symbolic links", lambda r: (symlink(r, "b/loop1.png", "loop2.png"), symlink(r, "b/loop2.png", "loop1.png")),
     {"b/loop1.png": "cannot read file", "b/loop2.png": "cannot read file"}),
    ("folder symlink loop", lambda r: symlink(r, "a/again", "."), {"a/again/": "folder already read"}),
    ("FIFO named .png", lambda r: os.mkfifo(r / "b" / "fifo.png"), {"b/fifo.png": "not a regular file"}),
    ("wrong size (30x30 among 28x28)", lambda r: write(r, "a/big.png", png(gray(30))), {"a/big.png": "wrong size"}),
    ("1x1 image", lambda r: write(r, "b/tiny.png", png(gray(1))), {"b/tiny.png": "wrong size"}),
    ("colour image in a gray set", lambda r: write(r, "a/colour.png", png(RNG.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))),
     {"a/colour.png": "wrong channels"}),
    ("colour CMYK JPEG in a gray set",
     lambda r: write(r, "b/cmyk.jpg", encoded(Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8), "CMYK"), "JPEG")),
     {"b/cmyk.jpg": "wrong channels"}),
    ("colour palette PNG in a gray set",
     lambda r: write(r, "a/palette.png",
                     encoded(Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).convert("P"), "PNG")),
     {"a/palette.png": "wrong channels"}),
    ("16-bit PNG", lambda r: write(r, "a/deep.png", encoded(Image.fromarray(gray().astype(np.uint16) * 257), "PNG")),
     {"a/deep.png": "unsupported mode"}),
    ("32-bit float TIFF", lambda r: write(r, "b/float.tiff", encoded(Image.fromarray(gray().astype(np.float32)), "TIFF")),
     {"b/float.tiff": "unsupported mode"}),
    ("animated GIF", lambda r: write(r, "a/anim.gif", _animated()), {"a/anim.gif": "animated image"}),
    ("hidden file", lambda r: write(r, "a/.DS_Store", RNG.bytes(50)), {"a/.DS_Store": "hidden file"}),
    ("AppleDouble ._ file with an image extension", lambda r: write(r, "b/._img.png", RNG.bytes(80)),
     {"b/._img.png": "hidden file"}),
    ("hidden folder of images", lambda r: write(r, "a/.ipynb_checkpoints/x.png", png()),
     {"a/.ipynb_checkpoints/": "hidden folder"}),
    ("non-image extension", lambda r: write(r, "b/labels.csv", b"x,y\n"), {"b/labels.csv": "not an image file"}),
    ("file outside the class folders", lambda r: write(r, "README.md", b"# data"), {"README.md": "not in a class folder"}),
    ("image outside the class folders", lambda r: write(r, "stray.png", png()), {"stray.png": "not in a class folder"}),
    ("empty class folder", lambda r: (r / "empty").mkdir(), {"empty/": "empty class folder"}),
    # Valid images in another form: loaded, converted exactly.
    ("duplicate file names across classes", lambda r: (write(r, "a/dup.png", png()), write(r, "b/dup.png", png())),
     {"a/dup.png": "load", "b/dup.png": "load"}),
    ("gray image stored as RGB", lambda r: write(r, "b/rgbgray.png", png(np.repeat(gray()[..., None], 3, 2))),
     {"b/rgbgray.png": "load"}),
    ("gray CMYK JPEG", lambda r: write(r, "a/cmykgray.jpg", encoded(Image.fromarray(gray()).convert("CMYK"), "JPEG")),
     {"a/cmykgray.jpg": "load"}),
    ("gray palette PNG", lambda r: write(r, "b/pal.png", encoded(Image.fromarray(gray()).convert("P"), "PNG")),
     {"b/pal.png": "load"}),
    ("LA (gray + alpha) PNG", lambda r: write(r, "a/la.png", encoded(Image.fromarray(gray()).convert("LA"), "PNG")),
     {"a/la.png": "load"}),
    ("1-bit PNG", lambda r: write(r, "b/bits.png", encoded(Image.fromarray(gray()).convert("1"), "PNG")),
     {"b/bits.png": "load"}),
    ("single-frame GIF", lambda r: write(r, "a/still.gif", encoded(Image.fromarray(gray()), "GIF")),
     {"a/still.gif": "load"}),
    ("upper-case extension, nested folder", lambda r: write(r, "b/sub/deep/UP.PNG", png()), {"b/sub/deep/UP.PNG": "load"}),
    ("markup in a file name", lambda r: write(r, "a/<img src=x onerror=alert(1)>.png", png()),
     {"a/<img src=x onerror=alert(1)>.png": "load"}),
]
if os.geteuid() != 0:  # root reads any file, so the case cannot be made
    FOLDER_CASES.append(("unreadable file (mode 000)", lambda r: (write(r, "b/secret.png", png()),
                                                                   os.chmod(r / "b" / "secret.png", 0)),
                         {"b/secret.png": "cannot read file"}))


def non_utf8_name(root: Path) -> str:
    """A file whose name is not valid UTF-8 (latin-1 bytes from an old archive)."""
    path = os.fsencode(root / "b") + b"/caf\xe9.png"
    with open(path, "wb") as f:
        f.write(png())
    return "b/caf\ufffd.png"  # shown with U+FFFD, so that it can be written anywhere


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for cls in ("a", "b"):
        for i in range(6):
            write(root, f"{cls}/good{i}.png", png())
    expected = {}
    for _, make, want in FOLDER_CASES:
        make(root)
        expected.update(want)
    expected[non_utf8_name(root)] = "load"
    return root, expected


def test_folder_corpus_every_entry_loads_or_is_skipped_with_its_reason(corpus):
    root, expected = corpus
    ds = load_dataset(root)
    reasons = {s.name: s.reason for s in ds.skipped}
    for name, want in expected.items():
        if want == "load":
            assert name in ds.names, f"{name} should load; skipped: {reasons.get(name)}"
        else:
            assert name in reasons, f"{name} should be skipped ({want}); loaded: {name in ds.names}"
            assert reasons[name].startswith(want), f"{name}: {reasons[name]!r}"
    assert set(reasons) == {n for n, w in expected.items() if w != "load"}  # nothing else is skipped
    assert ds.classes == ["a", "b", "empty"] and ds.shape == (SIDE, SIDE, 1)
    assert len(ds) == 12 + sum(1 for w in expected.values() if w == "load")
    i, j = ds.names.index("a/dup.png"), ds.names.index("b/dup.png")
    assert (ds.labels[i], ds.labels[j]) == (0, 1)
    # Exact conversions: a gray image stored as RGB, or with a gray palette, keeps its pixels.
    k = ds.names.index("b/rgbgray.png")
    np.testing.assert_array_equal(ds.images[k, ..., 0], np.asarray(Image.open(root / "b" / "rgbgray.png"))[..., 0])
    # A second load (from the cache) reports the same.
    again = load_dataset(root)
    assert again.skipped == ds.skipped and again.names == ds.names
    table = os.environ.get("FLIPBACK_BAD_INPUT_TABLE")  # docs/reliability.md shows this table
    if table:
        with open(table, "w") as f:
            f.write("| case | entry | outcome |\n|---|---|---|\n")
            for kind, _, want in FOLDER_CASES + [("file name not valid UTF-8", None, {"b/caf\ufffd.png": "load"})]:
                for name in want:
                    outcome = "loaded" if name in ds.names else f"skipped: {reasons[name]}"
                    f.write(f"| {kind} | `{name}` | {outcome.replace('|', '/').replace('<', '&lt;')} |\n")


def test_folder_corpus_through_a_real_explain_run(corpus, tmp_path):
    root, expected = corpus
    torch.manual_seed(0)
    ckpt = tmp_path / "net.th"
    torch.save(SmallCNN(3).state_dict(), ckpt)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["explain", "--model", f"small_cnn:{ckpt}", "--data", str(root), "--out", str(out),
                                   "--method", "fast", "--limit", "5", "--no-figures"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    # The zoo model's input size is known, so images of another size are resized and cropped to
    # it (tests/test_preprocess.py) instead of skipped.
    skipped = [w for w in expected.values() if w not in ("load", "wrong size")]
    assert summary["n_skipped"] == len(skipped)
    by_reason = summary["skipped_by_reason"]
    assert sum(by_reason.values()) == len(skipped)
    assert by_reason["cannot decode image"] == skipped.count("cannot decode image")
    assert by_reason["empty file"] == 2 and by_reason["wrong channels"] == 3
    # The end-of-run line counts the skipped images by reason.
    line = next(ln for ln in res.output.splitlines() if ln.startswith("skipped:"))
    print(line)
    assert line.startswith(f"skipped: {len(skipped)} images (")
    for reason, n in by_reason.items():
        assert f"{reason}: {n}" in line
    assert (out / "index.html").is_file()


# ------------------------------------------------------------------------- .npz and IDX


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _images(n=6, dtype=np.uint8):
    x = RNG.integers(0, 256, (n, SIDE, SIDE)).astype(np.uint8)
    return x if dtype == np.uint8 else (x / 255).astype(dtype)


def _with(arr, i, value):
    arr = arr.copy()
    arr.flat[i] = value
    return arr


# kind -> (arrays, {row: reason start}) for images skipped one by one
NPZ_SKIPS = {
    "label outside the class list": (dict(images=_images(), labels=np.array([0, 1, 9, 0, 1, 0]), classes=np.array(["x", "y"])),
                                     {2: "label outside the class list"}),
    "negative label (missing)": (dict(images=_images(), labels=np.array([0, -1, 1, 0, 1, 0])), {1: "missing label"}),
    "NaN label": (dict(images=_images(), labels=np.array([0, 1, np.nan, 1, 0, 1])), {2: "missing label: NaN"}),
    "NaN pixel": (dict(images=_with(_images(dtype=np.float32), 3 * SIDE * SIDE + 5, np.nan), labels=np.arange(6) % 2),
                  {3: "non-finite pixels"}),
    "infinite pixel": (dict(images=_with(_images(dtype=np.float64), 7, np.inf), labels=np.arange(6) % 2),
                       {0: "non-finite pixels"}),
    "float pixel above 1": (dict(images=_with(_images(dtype=np.float32), 5 * SIDE * SIDE, 1.5), labels=np.arange(6) % 2),
                            {5: "pixels out of range"}),
    "negative integer pixel": (dict(images=_with(_images().astype(np.int16), 4 * SIDE * SIDE, -3), labels=np.arange(6) % 2),
                               {4: "pixels out of range"}),
}

# kind -> arrays (or raw bytes) that cannot be used at all: one clear DataError
NPZ_REFUSED = {
    "fractional labels": dict(images=_images(), labels=np.array([0, 0.5, 1, 0, 1, 0])),
    "label count mismatch": dict(images=_images(), labels=np.array([0, 1])),
    "object array (needs pickle)": dict(images=_images(), labels=np.arange(6) % 2,
                                        classes=np.array(["a", None], dtype=object)),
    "every image bad": dict(images=np.full((4, SIDE, SIDE), 7.0), labels=np.zeros(4, int)),
    "four channels": dict(images=np.zeros((3, SIDE, SIDE, 4), np.uint8), labels=np.zeros(3, int)),
    "2-D labels": dict(images=_images(), labels=np.zeros((6, 2), int)),
    "no labels": dict(images=_images()),
    "truncated .npz": b"truncate",
    "not a zip at all": b"\x89PNG\r\n\x1a\n not an npz",
}


@pytest.mark.parametrize("kind", sorted(NPZ_SKIPS))
def test_npz_bad_rows_are_skipped_one_by_one(kind, tmp_path):
    arrays, bad = NPZ_SKIPS[kind]
    ds = load_dataset(_npz(tmp_path / "d.npz", **arrays))
    assert {s.name: s.reason for s in ds.skipped}.keys() == {f"test/{i:06d}" for i in bad}
    for s in ds.skipped:
        assert s.reason.startswith(bad[int(s.name.split("/")[1])]), s.reason
    assert len(ds) == len(arrays["images"]) - len(bad)
    assert not set(ds.names) & {f"test/{i:06d}" for i in bad} and ds.images.dtype == np.uint8


@pytest.mark.parametrize("kind", sorted(NPZ_REFUSED))
def test_unusable_npz_is_one_clear_error(kind, tmp_path):
    spec = NPZ_REFUSED[kind]
    path = tmp_path / "d.npz"
    if isinstance(spec, bytes):
        if spec == b"truncate":
            _npz(path, images=_images(), labels=np.arange(6) % 2)
            path.write_bytes(path.read_bytes()[:200])
        else:
            path.write_bytes(spec)
    else:
        _npz(path, **spec)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert str(path) in err.value.message or "images" in err.value.message


def test_npz_with_bad_rows_through_a_real_explain_run(tmp_path):
    images = _images(12, np.float32)
    images[2, 0, 0] = np.nan
    images[7, 3, 3] = 2.0
    labels = np.array([0, 1, 0, 1, 0, -1, 1, 0, 1, 0, 1, 5])
    data = _npz(tmp_path / "d.npz", images=images, labels=labels, classes=np.array(["x", "y"]))
    ckpt = tmp_path / "net.th"
    torch.manual_seed(0)
    torch.save(SmallCNN(2).state_dict(), ckpt)
    res = CliRunner().invoke(app, ["explain", "--model", f"small_cnn:{ckpt}", "--data", str(data),
                                   "--out", str(tmp_path / "run"), "--method", "fast", "--no-figures"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_images"] == 8 and summary["skipped_by_reason"] == {
        "non-finite pixels": 1, "pixels out of range": 1, "missing label": 1, "label outside the class list": 1}
    assert "skipped: 4 images (" in res.output


def _idx(folder: Path, images: np.ndarray, labels: np.ndarray, *, image_bytes: bytes | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    raw = struct.pack(">IIII", 2051, len(images), SIDE, SIDE) + images.tobytes()
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw if image_bytes is None else image_bytes)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())
    return folder


def test_idx_label_outside_the_classes_is_skipped_and_broken_files_refused(tmp_path):
    x = _images(5)
    ds = load_dataset(_idx(tmp_path / "ok", x, np.array([1, 2, 12, 3, 200])))
    assert [(s.name, s.reason.split(":")[0]) for s in ds.skipped] == [
        ("test/000002", "label outside the class list"), ("test/000004", "label outside the class list")]
    assert len(ds) == 3
    np.testing.assert_array_equal(ds.images[2, ..., 0], x[3])
    broken = {
        "truncated": struct.pack(">IIII", 2051, 5, SIDE, SIDE) + x.tobytes()[:-10],
        "bad magic": struct.pack(">IIII", 2049, 5, SIDE, SIDE) + x.tobytes(),
        "count mismatch": struct.pack(">IIII", 2051, 4, SIDE, SIDE) + x[:4].tobytes(),
        "all labels outside": None,
    }
    for kind, raw in broken.items():
        labels = np.array([11, 12, 13, 14, 15]) if kind == "all labels outside" else np.arange(5)
        with pytest.raises(DataError):
            load_dataset(_idx(tmp_path / kind.replace(" ", "_"), x, labels, image_bytes=raw))

