"""Security through real `flipback explain` and `flipback report` runs (issue 6): no file
runs code unless trusted, markup in class and file names is escaped in every HTML output, and
no name from a data set or a tampered run folder writes outside the run folder.
(Server credentials: tests/test_reliability_server.py; the loader-level pickle tests:
tests/test_targets.py.)
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flipback.cli import app
from flipback.targets.zoo import SmallCNN

runner = CliRunner()
MARKUP = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\"'><svg onload=alert(2)>",
          "<b onmouseover=alert(3)>"]  # the last two also as folder and file names (no '/')


class _RunsCode:
    """Unpickling this runs os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, images=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 20))
    return path


@pytest.mark.parametrize("where", ["model", "surrogate"])
def test_a_checkpoint_that_would_run_code_is_refused_without_trust_model(where, data, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.th"
    torch.save({"state_dict": _RunsCode(marker)}, evil)
    if where == "model":
        cmd = ["explain", "--model", f"small_cnn:{evil}"]
    else:
        good = tmp_path / "net.th"
        torch.save(SmallCNN(10).state_dict(), good)
        cmd = ["explain", "--mode", "black-box", "--surrogate", str(evil), "--model", f"small_cnn:{good}"]
    res = runner.invoke(app, [*cmd, "--data", str(data), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not marker.exists()  # the payload never ran
    if where == "model":
        assert "--trust-model" in res.output


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_markup_and_dot_dot_names_are_escaped_and_stay_in_the_run_folder(tmp_path):
    escape = f"../../../../../../tmp/flipback-escape-{uuid.uuid4().hex}"
    rng = np.random.default_rng(1)
    # An .npz whose class names are paths out of the run folder, and markup.
    npz = tmp_path / "classes.npz"
    np.savez(npz, images=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), labels=np.arange(30) % 4,
             classes=np.array([escape, *MARKUP[:3]]))
    # An image folder whose class and file names are markup.
    folder = tmp_path / "folder"
    for cls in MARKUP[1:3] + ["a&b"]:
        for i in range(5):
            (folder / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / cls / f"{MARKUP[3]}{i}.png")
    torch.manual_seed(0)
    for k, data in ((4, npz), (3, folder)):
        ckpt = tmp_path / f"net{k}.th"
        torch.save(SmallCNN(k).state_dict(), ckpt)
        out = tmp_path / f"run-{k}"
        before = _files(tmp_path)
        res = runner.invoke(app, ["explain", "--model", f"small_cnn:{ckpt}", "--data", str(data), "--out", str(out),
                                  "--method", "fast", "--limit", "6"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        new = _files(tmp_path) - before
        assert new and all(p == out or out in p.parents for p in new), sorted(p for p in new if out not in p.parents)
        assert not Path(escape.replace("../", "")).exists() and not (out / escape).resolve().exists()
        summary = json.loads((out / "summary.json").read_text())
        assert set(MARKUP[1:3]) <= set(summary["classes"])  # the names are kept as data...
        pages = list(out.rglob("*.html"))
        assert any("&lt;img src=x onerror=alert(1)&gt;" in p.read_text(encoding="utf-8") for p in pages)
        for page in pages:  # ...shown escaped, never raw
            html = page.read_text(encoding="utf-8")
            for m in MARKUP:
                assert m not in html, (page, m)


def test_tampered_run_folder_paths_write_and_link_nothing_outside(tmp_path, data):
    torch.manual_seed(0)
    ckpt = tmp_path / "net.th"
    torch.save(SmallCNN(10).state_dict(), ckpt)
    out = tmp_path / "run"
    res = runner.invoke(app, ["--quiet", "explain", "--model", f"small_cnn:{ckpt}", "--data", str(data),
                              "--out", str(out), "--method", "fast", "--limit", "4", "--no-figures"])
    assert res.exit_code == 0, res.output
    db = sqlite3.connect(out / "results.sqlite")
    for idx, record in db.execute("SELECT idx, record FROM results").fetchall():
        rec = json.loads(record)
        rec.update(figure="../../outside.png", corrected_image="/etc/passwd", name="../../../x<script>")
        db.execute("UPDATE results SET record = ? WHERE idx = ?", (json.dumps(rec), idx))
    db.commit()
    db.close()
    before = _files(tmp_path)
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert all(out in p.parents for p in _files(tmp_path) - before)
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "../../outside.png" not in html and "/etc/passwd" not in html and "x<script>" not in html
