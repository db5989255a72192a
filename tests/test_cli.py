"""End-to-end runs of the command line on tiny generated data and models."""

import gzip
import json
import sqlite3
import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipback.cli import app
from flipback.targets.zoo import SmallCNN

REQUIRED = ("mode", "method", "model", "pixels", "n_images", "n_misclassified", "n_corrected", "success_rate",
            "mean_queries", "mean_queries_success", "median_l2", "median_linf", "seconds")

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def tiny(tmp_path):
    """A random small_cnn checkpoint in the public format and 60 random 28x28 images."""
    torch.manual_seed(0)
    net = SmallCNN(10)
    ckpt = tmp_path / "net.th"
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, ckpt)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 60))
    return ckpt, data


def test_explain_writes_a_complete_run(tiny, tmp_path):
    ckpt, data = tiny
    out = tmp_path / "run"
    res = invoke("--quiet", "explain", "--model", f"small_cnn:{ckpt}", "--data", data, "--out", out, "--limit", 12)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert all(k in summary for k in REQUIRED)
    assert summary["n_images"] == 60 and summary["n_explained"] == 12 and summary["pixels"] == "uint8"
    assert summary["success_rate"] == 1.0
    rows = sqlite3.connect(out / "results.sqlite").execute("SELECT record FROM results").fetchall()
    assert len(rows) == 12
    rec = json.loads(rows[0][0])
    assert (out / rec["figure"]).is_file() and (out / rec["corrected_image"]).is_file()
    assert (out / "index.html").is_file()
    # Each record keeps its trace, which ends at the stored correction, and the report plots
    # the frontier from them.
    records = [json.loads(r) for (r,) in rows]
    assert all(r["trace"] and r["trace"][-1][0] <= r["queries"] for r in records)
    assert all(r["trace"][-1][1] == pytest.approx(r["l2"], abs=1e-5) for r in records if r["success"])
    assert (out / "report" / "plots" / "frontier.png").is_file()
    # The saved 8-bit image is what the model verified: it is classified as the true label.
    from PIL import Image

    img = np.asarray(Image.open(out / rec["corrected_image"]), dtype=np.float32) / 255
    logits = torch.nn.Sequential()  # placeholder to keep names short below
    from flipback.targets import load_model

    model = load_model(f"small_cnn:{ckpt}", 10).module
    with torch.no_grad():
        logits = model(torch.from_numpy(img)[None, None])
    assert int(logits.argmax()) == rec["true"]


def test_resume_recomputes_only_missing_images_and_refuses_other_settings(tiny, tmp_path):
    ckpt, data = tiny
    out = tmp_path / "run"
    args = ("--quiet", "explain", "--model", f"small_cnn:{ckpt}", "--data", data, "--out", out, "--limit", 10,
            "--method", "fast", "--no-figures")
    assert invoke(*args).exit_code == 0
    first = json.loads((out / "summary.json").read_text())
    db = sqlite3.connect(out / "results.sqlite")
    before = dict(db.execute("SELECT idx, record FROM results"))
    with db:
        db.execute("DELETE FROM results WHERE idx IN (SELECT idx FROM results ORDER BY idx LIMIT 4)")
    db.close()
    assert invoke(*args).exit_code == 0
    after = dict(sqlite3.connect(out / "results.sqlite").execute("SELECT idx, record FROM results"))
    assert before.keys() == after.keys()
    assert all(json.loads(before[k])["queries"] == json.loads(after[k])["queries"] for k in before)
    assert json.loads((out / "summary.json").read_text())["mean_queries"] == first["mean_queries"]

    other = [a if a != "fast" else "paper" for a in args]
    res = runner.invoke(app, [str(a) for a in other])
    assert res.exit_code == 2 and "other settings" in res.output and "Traceback" not in res.output


def test_bench_paper_writes_one_entry_per_method(tiny, tmp_path):
    ckpt, data = tiny
    out = tmp_path / "bench"
    res = invoke("--quiet", "bench", "paper", "--mode", "white-box", "--model", f"small_cnn:{ckpt}", "--data", data,
                 "--out", out, "--limit", 8)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"paper", "fast", "minimal"}
    assert all(k in summary for k in REQUIRED) and summary["method"] == "paper"
    assert summary["published"] == {"success_rate": 0.9967, "mean_queries": 1.96}
    for s in summary["methods"].values():
        assert all(k in s for k in REQUIRED)


def _error(res):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.output


@pytest.mark.parametrize("case", ["empty_folder", "missing_path", "label_out_of_range", "wrong_outputs",
                                  "checkpoint_mismatch", "wrong_channels", "unknown_method"])
def test_bad_input_is_one_clear_error(case, tiny, tmp_path):
    ckpt, data = tiny
    model = f"small_cnn:{ckpt}"
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data, expect = tmp_path / "empty", "error"
    elif case == "missing_path":
        data, expect = tmp_path / "nope", "error"
    elif case == "label_out_of_range":
        data = tmp_path / "bad.npz"
        # Every label outside the class list (one alone is skipped: tests/test_bad_input.py).
        np.savez(data, images=np.zeros((4, 28, 28), np.uint8), labels=np.array([3, 4, 5, 7]),
                 classes=np.array(["a", "b", "c"]))
        expect = "label"
    elif case == "wrong_outputs":
        scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 5)))
        model = str(tmp_path / "m.pt")
        scripted.save(model)
        expect = "outputs"
    elif case == "checkpoint_mismatch":
        model, expect = f"cifar_resnet20:{ckpt}", "does not match"
    elif case == "wrong_channels":
        data = tmp_path / "rgb.npz"
        np.savez(data, images=np.zeros((4, 28, 28, 3), np.uint8), labels=np.arange(4),
                 classes=np.array([str(i) for i in range(10)]))
        expect = "expects"
    else:
        expect = "unknown method"
    extra = ["--method", "nonsense"] if case == "unknown_method" else []
    res = runner.invoke(app, ["explain", "--model", model, "--data", str(data), "--out", str(tmp_path / "o"), *extra])
    assert expect in _error(res).lower()


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    root = tmp_path / "folder"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "b" / "empty.jpg").write_bytes(b"")
    ckpt = tmp_path / "net.th"
    torch.save(SmallCNN(2).state_dict(), ckpt)
    res = invoke("--quiet", "explain", "--model", f"small_cnn:{ckpt}", "--data", root, "--out", tmp_path / "o",
                 "--no-figures")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["n_images"] == 12 and summary["n_skipped"] == 2


def _write_idx(folder, prefix, images, labels):
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def test_demo_trains_once_and_explains(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    # Learnable toy data: the class sets the brightness of a stripe.
    for prefix, n in (("train", 300), ("t10k", 60)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 * y:2 * y + 3] = 200
        if prefix == "t10k":  # mislabel a third of the test set, so that there are errors to explain
            labels[: n // 3] = (labels[: n // 3] + 1) % 10
        _write_idx(folder, prefix, images, labels)
    out = tmp_path / "demo"
    res = invoke("--quiet", "demo", "--data", folder, "--out", out, "--limit", 5)
    assert res.exit_code == 0, res.output
    for mode in ("white-box", "black-box"):
        summary = json.loads((out / mode / "summary.json").read_text())
        assert summary["mode"] == mode and summary["n_explained"] == 5
        assert (out / mode / "index.html").is_file()
    black = json.loads((out / "black-box" / "summary.json").read_text())
    assert black["surrogate_queries"] == 300 and black["method"] == "minimal"  # transfer, then shrink
    assert black["options"] == {"confidence": 0.5}  # the demo's validated transfer margin, recorded
    res2 = runner.invoke(app, ["demo", "--data", str(folder), "--out", str(out), "--limit", "5"])
    assert res2.exit_code == 0 and "cached model" in res2.output and "cached surrogate" in res2.output
    # A newer flipback with other demo settings: the earlier run is kept aside, not an error.
    from flipback.runs import demo as demo_module

    monkeypatch.setattr(demo_module, "BLACK_BOX_OPTIONS", {"confidence": 1.0})
    res3 = runner.invoke(app, ["demo", "--data", str(folder), "--out", str(out), "--limit", "5"])
    assert res3.exit_code == 0 and "earlier run is kept" in res3.output, res3.output
    assert json.loads((out / "black-box.earlier-1" / "summary.json").read_text())["options"] == {"confidence": 0.5}
    assert json.loads((out / "black-box" / "summary.json").read_text())["options"] == {"confidence": 1.0}
    assert not (out / "white-box.earlier-1").exists()  # the white-box half's settings did not change


def test_demo_without_data_says_how_to_get_it(tmp_path):
    res = runner.invoke(app, ["demo", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "apt-get install dataset-fashion-mnist" in _error(res)


@pytest.mark.parametrize("output", ["scores", "label"])
def test_black_box_surrogate_then_explain(tiny, tmp_path, output):
    ckpt, data = tiny
    sur = tmp_path / "sur.th"
    res = invoke("--quiet", "surrogate", "--target", f"small_cnn:{ckpt}", "--data", data, "--budget", 40,
                 "--epochs", 2, "--output", output, "--out", sur)
    assert res.exit_code == 0, res.output
    out = tmp_path / "bb"
    res = invoke("--quiet", "explain", "--mode", "black-box", "--model", f"small_cnn:{ckpt}", "--data", data,
                 "--surrogate", sur, "--output", output, "--method", "fast", "--budget", 3, "--limit", 6,
                 "--no-figures", "--out", out)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert all(k in summary for k in REQUIRED + ("surrogate_queries", "surrogate_agreement"))
    assert summary["mode"] == "black-box" and summary["surrogate_queries"] == 40 and summary["output"] == output
    records = [json.loads(r) for (r,) in sqlite3.connect(out / "results.sqlite").execute("SELECT record FROM results")]
    assert len(records) == 6 and all(1 <= r["queries"] <= 3 for r in records)  # the per-image budget holds


def test_confidence_reaches_fast_and_is_refused_elsewhere(tiny, tmp_path, monkeypatch):
    from flipback.attacks import fast as fast_module

    ckpt, data = tiny
    sur = tmp_path / "sur.th"
    assert invoke("--quiet", "surrogate", "--target", f"small_cnn:{ckpt}", "--data", data, "--budget", 40,
                  "--epochs", 1, "--out", sur).exit_code == 0
    seen = []
    init = fast_module.FastAttack.__init__

    def spy(self, **kwargs):
        seen.append(kwargs.get("confidence"))
        init(self, **kwargs)

    monkeypatch.setattr(fast_module.FastAttack, "__init__", spy)
    for conf, out in ((None, tmp_path / "a"), (16, tmp_path / "b")):
        extra = ["--confidence", conf] if conf else []
        res = invoke("--quiet", "explain", "--mode", "black-box", "--model", f"small_cnn:{ckpt}", "--data", data,
                     "--surrogate", sur, "--method", "fast", "--limit", 3, "--no-figures", "--out", out, *extra)
        assert res.exit_code == 0, res.output
    assert seen == [None, 16.0]  # the default (4 logits) when not given
    for method, mode in (("paper", "black-box"), ("fast", "white-box")):
        res = invoke("explain", "--model", f"small_cnn:{ckpt}", "--data", data, "--mode", mode, "--surrogate", sur,
                     "--method", method, "--confidence", 8, "--out", tmp_path / "c")
        assert "--confidence applies to the fast and minimal methods in black-box mode only" in _error(res)
