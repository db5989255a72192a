"""`flipback surrogate` refuses test data unless --allow-test-data, and records the split.

A surrogate trained on the images it will later explain has seen the target's answers on
them, which flatters the black-box results: test data (a test split, a folder or file whose
name says test, t10k or val) is refused before any query, and the split is kept in the file.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from random_models import save_random_surrogate
from typer.testing import CliRunner

from flipback.cli import app
from flipback.errors import DataError
from flipback.runs.bench import run_bench
from flipback.runs.surrogate_run import run_surrogate
from flipback.targets.surrogate import load_surrogate

runner = CliRunner()

TARGET = '''
from pathlib import Path
import numpy as np

CALLS = Path(__file__).with_suffix(".calls")

def predict(x):
    """K classes by brightness; every call is logged, so that a test can count them."""
    with CALLS.open("a") as f:
        f.write(f"{len(x)}\\n")
    s = x.reshape(len(x), -1).mean(1, keepdims=True)
    return -np.abs(s - np.linspace(0, 1, K)).astype(np.float32)
'''


def _target(folder: Path, k: int = 2):
    """A python: target spec of k classes, and a function giving the number of images it was sent."""
    path = folder / f"target{k}.py"
    path.write_text(f"K = {k}\n" + TARGET)
    calls = path.with_suffix(".calls")
    return f"python:{path}:predict", lambda: sum(map(int, calls.read_text().split())) if calls.exists() else 0


@pytest.fixture
def target(tmp_path):
    return _target(tmp_path)


def _pngs(folder: Path, n: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("bright", "dark"):
        (folder / cls).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    return folder


@pytest.fixture
def splits(tmp_path):
    """An image folder with train/ and test/ splits, each of two classes."""
    root = tmp_path / "cifar"
    _pngs(root / "train", seed=0)
    _pngs(root / "test", seed=1)
    return root


def _write_idx(folder: Path, prefix: str, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return folder / f"{prefix}-images-idx3-ubyte.gz"


def _surrogate(target, data, out, *extra):
    return runner.invoke(app, ["surrogate", "--target", target, "--data", str(data), "--budget", "12",
                               "--epochs", "1", "--members", "cnn8", "--out", str(out), *map(str, extra)])


def _refused(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    hints = [line for line in lines if line.startswith("hint:")]
    assert len(errors) == 1 and "test data" in errors[0], res.output
    assert len(hints) == 1 and "--allow-test-data" in hints[0], res.output
    return errors[0]


@pytest.mark.parametrize("how", ["split_option", "test_folder", "symlink_to_test_folder", "under_test_folder"])
def test_image_folder_test_data_is_refused_before_any_query(target, splits, tmp_path, how):
    spec, sent = target
    if how == "split_option":
        args = (splits, "--split", "test")
    elif how == "test_folder":
        args = (splits / "test",)
    elif how == "symlink_to_test_folder":  # the resolved path decides
        (tmp_path / "mydata").symlink_to(splits / "test")
        args = (tmp_path / "mydata",)
    else:  # .../test/fashion/<class>/*.png: a folder above it says test
        _pngs(tmp_path / "test" / "fashion")
        args = (tmp_path / "test" / "fashion",)
    out = tmp_path / "sur.th"
    _refused(_surrogate(spec, *args[:1], out, *args[1:]))
    assert not out.exists() and sent() == 0


@pytest.mark.parametrize("how", ["t10k_file", "idx_folder_split_test", "npz_named_test", "val_folder"])
def test_other_test_data_is_refused(tmp_path, how):
    spec, sent = _target(tmp_path, 10 if "idx" in how or "t10k" in how else 2)
    extra = ()
    if how == "t10k_file":
        data = _write_idx(tmp_path / "fmnist", "t10k")
    elif how == "idx_folder_split_test":
        _write_idx(tmp_path / "fmnist", "train")
        _write_idx(tmp_path / "fmnist", "t10k")
        data, extra = tmp_path / "fmnist", ("--split", "test")
    elif how == "npz_named_test":
        data = tmp_path / "fashion_test.npz"
        np.savez(data, images=np.zeros((12, 28, 28), np.uint8), labels=np.arange(12) % 2)
    else:
        data = _pngs(tmp_path / "imagenet" / "val")
    out = tmp_path / "sur.th"
    _refused(_surrogate(spec, data, out, *extra))
    assert not out.exists() and sent() == 0


def test_allow_test_data_trains_and_records_the_split(target, splits, tmp_path):
    spec, sent = target
    out = tmp_path / "sur.th"
    res = _surrogate(spec, splits / "test", out, "--allow-test-data")
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and "test data" in res.output
    assert sent() >= 12  # and a probe of the target's output
    assert load_surrogate(out).meta["split"] == "test"


@pytest.mark.parametrize("how, split", [("split_folders", "train"), ("train_folder", "train"),
                                         ("train_idx_file", "train"), ("plain_npz", "unknown")])
def test_training_data_is_accepted_and_its_split_recorded(target, splits, tmp_path, how, split):
    spec, _ = _target(tmp_path, 10) if how == "train_idx_file" else target
    data = {"split_folders": lambda: splits,  # --split defaults to train
            "train_folder": lambda: splits / "train",
            "train_idx_file": lambda: _write_idx(tmp_path / "fmnist", "train"),
            "plain_npz": lambda: _npz(tmp_path / "mine" / "images.npz")}[how]()
    out = tmp_path / "sur.th"
    res = _surrogate(spec, data, out)
    assert res.exit_code == 0, res.output
    assert load_surrogate(out).meta["split"] == split


def _npz(path: Path) -> Path:
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), labels=rng.integers(0, 2, 12))
    return path


def test_nearest_name_decides_and_only_whole_folder_names_count(tmp_path):
    from flipback.data import split_of

    # A user called "test" keeps a training set: the nearest name, train, decides.
    assert split_of(_pngs(tmp_path / "home" / "test" / "cifar" / "train"))[0] == "train"
    # pytest's own folders (test_x0), a "tests" folder and "latest" are not test data.
    assert split_of(_pngs(tmp_path / "tests" / "latest"))[0] == "unknown"
    # The data folder's own name counts word by word.
    assert split_of(_pngs(tmp_path / "cifar10-test"))[0] == "test"
    assert split_of(_pngs(tmp_path / "cifar10_train"))[0] == "train"


def test_python_api_refuses_test_data_too(target, splits, tmp_path):
    spec, sent = target
    with pytest.raises(DataError, match="test data"):
        run_surrogate(target=spec, data=str(splits), split="test", budget=12, out=tmp_path / "s.th", epochs=1,
                      members="cnn8", show_progress=False, log=lambda _: None)
    meta = run_surrogate(target=spec, data=str(splits), split="test", budget=12, out=tmp_path / "s.th", epochs=1,
                         members="cnn8", allow_test_data=True, show_progress=False, log=lambda _: None)
    assert meta["split"] == "test" and sent() >= 12


def test_black_box_bench_refuses_test_surrogate_data(target, splits, tmp_path):
    spec, sent = target
    out = tmp_path / "bench"
    with pytest.raises(DataError, match="test data"):
        run_bench(model=spec, data=str(splits / "test"), out_dir=out, mode="black-box",
                  surrogate_data=str(splits / "test"), surrogate_budget=12, show_progress=False, log=lambda _: None)
    assert sent() == 0 and not list(out.glob("surrogate-*"))


def test_old_surrogate_files_without_a_split_still_load(tmp_path):
    path = save_random_surrogate(tmp_path / "old.th")
    assert "split" not in torch.load(path, weights_only=True)["meta"]
    assert load_surrogate(path).meta["split"] == "unknown"
