"""Kill tests: a real `flipback explain` process is killed with SIGKILL at random (seeded)
moments and resumed each time. Its final results must be identical to an uninterrupted run
with the same seed, and its total queries no higher (issue 6).

A third of the kills fall at a random time after the start (so some land while Python
starts, the image cache is built, the model loads or the errors are found); the others wait
for the next committed batch and then a random few milliseconds more, so that they land
while images are being explained, figures written and batches committed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from random_models import save_random_surrogate
from run_folders import committed_rows
from flipback.targets.zoo import SmallCNN

KILLS_PER_MODE = 11  # 22 in all
LIMIT = 48  # errors explained per run: enough batches to kill between, small enough to be quick
SEED = 20240611


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random small_cnn checkpoint, a random surrogate, and 200 random 28x28 images as an
    image folder (white-box runs: the decode cache is built inside the killed process) and as
    a .npz (black-box runs)."""
    d = tmp_path_factory.mktemp("kill")
    torch.manual_seed(0)
    torch.save(SmallCNN(10).state_dict(), d / "net.th")
    save_random_surrogate(d / "sur.th")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), rng.integers(0, 10, 200)
    np.savez(d / "data.npz", images=images, labels=labels)
    for i, (im, y) in enumerate(zip(images, labels)):
        (d / "folder" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / "folder" / str(y) / f"{i:04d}.png")
    return d


def _command(mode: str, d: Path, out: Path) -> list[str]:
    common = ["--model", f"small_cnn:{d / 'net.th'}", "--out", str(out), "--batch-size", "3",
              "--limit", str(LIMIT)]
    if mode == "white-box":  # the default minimal method, with per-image figures
        return [sys.executable, "-m", "flipback", "--quiet", "explain", "--data", str(d / "folder"), *common]
    return [sys.executable, "-m", "flipback", "--quiet", "explain", "--mode", "black-box", "--method", "fast",
            "--budget", "4", "--surrogate", str(d / "sur.th"), "--data", str(d / "data.npz"), "--no-figures",
            *common]


def _env(cache: Path) -> dict:
    return {**os.environ, "FLIPBACK_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _final_state(out: Path) -> dict:
    """Everything a finished run leaves that must not depend on kills: every stored record,
    original and corrected image (bytes), and the PNG files the records point to."""
    con = sqlite3.connect(out / "results.sqlite")
    rows = con.execute("SELECT idx, record, corrected, dtype, original FROM results ORDER BY idx").fetchall()
    con.close()
    state = {}
    for idx, record, corrected, dtype, original in rows:
        rec = json.loads(record)
        files = {k: (out / rec[k]).read_bytes() for k in ("figure", "corrected_image") if rec.get(k)}
        state[idx] = (rec, corrected, dtype, original, files)
    return state


def _kill_and_resume(mode: str, d: Path, out: Path, cache: Path, rng: random.Random, reference_s: float):
    """Start the run, SIGKILL it at a random moment, again and again, then let it finish.
    Returns how many results were committed at each kill."""
    cmd, env = _command(mode, d, out), _env(cache)
    at_kill: list[int] = []
    finished_s = None  # how long a resume of the finished run takes, once it is finished
    for attempt in range(6 * KILLS_PER_MODE):
        if len(at_kill) == KILLS_PER_MODE:
            break
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if finished_s is not None:  # kill the resume of a finished run (summary and report writing)
                time.sleep(rng.uniform(0.3, 1.0) * finished_s)
            elif attempt % 3 == 0:  # a random moment in a run's life (start-up takes about half of it),
                # but never after the run got more than two batches further: on a loaded machine the
                # reference time says little, and a run that finished leaves nothing to kill mid-way
                stop_at = min(LIMIT - 1, committed_rows(out) + 6)
                deadline = time.monotonic() + rng.uniform(0.05, 0.6) * reference_s
                while proc.poll() is None and committed_rows(out) < stop_at and time.monotonic() < deadline:
                    time.sleep(0.005)
            else:  # a random moment while images are being explained: just after the next commit,
                # soon enough that a fast machine has not finished the run meanwhile
                want = committed_rows(out) + 3
                deadline = time.monotonic() + 3 * reference_s
                while proc.poll() is None and committed_rows(out) < want and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.03))
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            stderr = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
        # The return code says whether the kill landed: the run may exit between poll() and kill().
        if proc.returncode == -signal.SIGKILL:
            at_kill.append(committed_rows(out))
        else:  # it finished before the kill: later kills hit the resume of a finished run
            assert proc.returncode == 0, stderr
            finished_s = time.monotonic() - t0
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return at_kill


@pytest.mark.parametrize("mode", ["white-box", "black-box"])
def test_sigkill_at_random_moments_then_resume_gives_identical_results(mode, setup, tmp_path):
    rng = random.Random(f"{SEED}-{mode}")
    t0 = time.monotonic()
    ref = subprocess.run(_command(mode, setup, tmp_path / "ref"), env=_env(tmp_path / "cache-ref"),
                         capture_output=True, text=True, timeout=300)
    reference_s = time.monotonic() - t0
    assert ref.returncode == 0, ref.stderr
    expected = _final_state(tmp_path / "ref")
    assert len(expected) == LIMIT

    # A fresh cache, so that early kills also interrupt the image folder's decode.
    killed = tmp_path / "killed"
    at_kill = _kill_and_resume(mode, setup, killed, tmp_path / "cache-killed", rng, reference_s)
    assert len(at_kill) == KILLS_PER_MODE
    print(f"{mode}: {reference_s:.1f} s uninterrupted; results committed at each of the {len(at_kill)} kills: {at_kill}")
    assert sum(0 < n < LIMIT for n in at_kill) >= 3, f"too few kills landed while images were explained: {at_kill}"

    got = _final_state(killed)
    assert sorted(got) == sorted(expected)
    for idx in expected:
        rec, corrected, dtype, original, files = got[idx]
        ref_rec, ref_corrected, ref_dtype, ref_original, ref_files = expected[idx]
        assert rec == ref_rec, f"image {idx}: the record differs after kills"
        assert (corrected, dtype, original) == (ref_corrected, ref_dtype, ref_original), f"image {idx}"
        assert files == ref_files, f"image {idx}: files on disk differ"
    total = sum(r[0]["queries"] for r in got.values())
    assert total <= sum(r[0]["queries"] for r in expected.values())
    summary = json.loads((killed / "summary.json").read_text())
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    for key in ("n_images", "n_misclassified", "n_explained", "n_corrected", "mean_queries", "median_l2"):
        assert summary[key] == ref_summary[key], key
    assert (killed / "index.html").is_file()
