"""Server faults through full `flipback explain` runs (issue 6): a real KServe model server
process on loopback, behind the fault-injecting proxy of tests/servers/fault_proxy.py.

Each case must end completed or cleanly stopped (exit 2, one line, results kept), resume to
completion, and stay within budget: no image records more queries than --budget, the records
add up to what the accountant counted, and every image the server evaluated was counted.

With FLIPBACK_FAULT_TABLE=FILE set, the outcome of each case is appended to FILE as a row of
a Markdown table (docs/reliability.md shows one).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

# Plain imports: the test extra installs kserve, and onnxruntime and tritonclient are core
# dependencies, so a missing one fails the suite instead of silently skipping these tests.
import kserve  # noqa: F401
import onnxruntime  # noqa: F401
import tritonclient.http  # noqa: F401

from servers.kserve_process import ServerProcess  # noqa: E402

from flipback.cli import app  # noqa: E402
from flipback.targets.export import export_onnx  # noqa: E402
from random_models import save_random_surrogate  # noqa: E402
from flipback.targets.zoo import Normalized, SmallCNN  # noqa: E402

BUDGET, LIMIT = 4, 16
SECRET = "tok-3f9a-do-not-leak"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    onnx = export_onnx(Normalized(SmallCNN(10), (0.5,), (0.5,)).eval(), d / "small.onnx", (1, 28, 28))
    save_random_surrogate(d / "sur.th")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 10, 40))
    return d, onnx


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    _, onnx = files
    srv = ServerProcess(["--model", f"cnn={onnx}", "--num-classes", "10", "--threads", "1"],
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.start()
    finally:
        srv.stop()


def args(files, url, out, *extra):
    d, _ = files
    return ["--quiet", "explain", "--mode", "black-box", "--method", "fast", "--budget", str(BUDGET),
            "--surrogate", str(d / "sur.th"), "--model", url, "--data", str(d / "data.npz"), "--out", str(out),
            "--limit", str(LIMIT), "--batch-size", "8", "--no-figures", "--retries", "2", *extra]


def explain(files, url, out, *extra):
    return CliRunner().invoke(app, args(files, url, out, *extra), catch_exceptions=False)


def records(out: Path) -> dict[int, dict]:
    rows = sqlite3.connect(out / "results.sqlite").execute("SELECT idx, record FROM results").fetchall()
    return {i: json.loads(r) for i, r in rows}


def images(out: Path) -> dict[int, bytes]:
    return dict(sqlite3.connect(out / "results.sqlite").execute("SELECT idx, corrected FROM results").fetchall())


@pytest.fixture(scope="module")
def reference(files, server, tmp_path_factory):
    """The same run straight to the server, without faults."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = explain(files, server.url("cnn"), out)
    assert res.exit_code == 0, res.output
    return out


def record_outcome(case: str, first: str, final: str, recs: dict, note: str) -> None:
    path = os.environ.get("FLIPBACK_FAULT_TABLE")
    if path:
        q = [r["queries"] for r in recs.values()]
        with open(path, "a") as f:
            f.write(f"| {case} | {first} | {final} | {len(recs)} | {sum(r['success'] for r in recs.values())} | "
                    f"{max(q)} | {sum(q)} | {note} |\n")


def check_within_budget(out: Path, session: dict, evaluated_by_server: int) -> dict:
    recs = records(out)
    assert len(recs) == LIMIT
    assert all(r["queries"] <= BUDGET for r in recs.values())
    # Every image the server evaluated was counted (as a query, or as a free unmodified image).
    assert evaluated_by_server <= session["queries"] + session["uncounted"]
    return recs


# Request 0 asks for the predictions of all 40 images, request 1 the scores of the first batch's
# unmodified images; request 2 is the first counted query.
CASES = {
    "HTTP 500 twice": (["ok", "ok", "500", "500"], "retried; the failed attempts count"),
    "HTTP 503 during predictions": (["503:0.1"], "retried; free (unmodified images)"),
    "HTTP 429, Retry-After 0.3 s, twice": (["ok", "ok", "429:0.3", "429:0.3"], "waited; not counted"),
    "hang past the 2 s timeout": (["ok", "ok", "hang:6"], "retried; the timed-out attempt counts"),
    "dropped connection": (["ok", "ok", "drop"], "retried; counts"),
    "garbage JSON": (["ok", "ok", "garbage"], "batch redone image by image"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_then_completed_within_budget(case, files, proxy, reference, tmp_path):
    schedule, note = CASES[case]
    proxy.set_schedule(schedule)
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = explain(files, proxy.url("cnn"), out, "--timeout", "2")
    assert res.exit_code == 0, res.output
    session = json.loads((out / "summary.json").read_text())["target_session"]
    recs = check_within_budget(out, session, proxy.evaluated)
    assert sum(r["queries"] for r in recs.values()) == session["queries"]
    assert set(recs) == set(records(reference))
    if case.startswith(("HTTP 429", "HTTP 503")):  # nothing counted twice: the very same results
        assert recs == records(reference) and images(out) == images(reference)
    if "429" in case:
        assert time.monotonic() - t0 >= 0.6 and session["wait_seconds"] >= 0.6
    if case != "garbage JSON":
        assert session["retries"] >= 1
    record_outcome(case, "completed (exit 0)", "-", recs, note)


def test_server_failing_for_good_stops_cleanly_and_resumes(files, proxy, reference, tmp_path):
    out = tmp_path / "run"
    proxy.set_schedule(["ok", "ok", "ok"] + ["500"] * 40)
    res = explain(files, proxy.url("cnn"), out)
    assert res.exit_code == 2 and "stopped answering" in res.output and "Traceback" not in res.output
    assert len(records(out)) < LIMIT  # nothing of the failed batch was committed
    proxy.set_schedule([])
    res = explain(files, proxy.url("cnn"), out)
    assert res.exit_code == 0, res.output
    session = json.loads((out / "summary.json").read_text())["target_session"]
    recs = check_within_budget(out, session, 0)  # the budget held across both sessions
    record_outcome("HTTP 500 on every attempt", "stopped (exit 2): the target stopped answering",
                   "completed (exit 0)", recs, "unfinished images keep what they spent")


def test_server_killed_and_restarted_during_a_run(files, reference, tmp_path):
    _, onnx = files
    srv = ServerProcess(["--model", f"cnn={onnx}", "--num-classes", "10", "--threads", "1"], tmp_path / "srv.log")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flipback", *args(files, srv.url("cnn"), out), "--timeout", "5"]
    try:
        srv.start()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in-process tests: two threads on two busy cores crawl
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline:
            db = out / "results.sqlite"
            if db.exists():
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
                try:
                    if con.execute("SELECT COUNT(*) FROM results").fetchone()[0] >= 8:
                        break
                except sqlite3.Error:
                    pass
                finally:
                    con.close()
            time.sleep(0.02)
        srv.kill()  # as a crash would
        _, stderr = run.communicate(timeout=120)
        killed_midway = run.returncode == 2
        if killed_midway:  # (it may also have finished first, on a fast machine)
            assert "stopped answering" in stderr or "cannot be reached" in stderr, stderr
        else:
            assert run.returncode == 0, stderr
        srv.launch()
        srv.wait_ready()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
    finally:
        srv.stop()
    recs = records(out)
    assert set(recs) == set(records(reference)) and all(r["queries"] <= BUDGET for r in recs.values())
    # Batches committed before the crash are exactly the reference's.
    ref = records(reference)
    assert sum(recs[i] == ref[i] for i in recs) >= 8
    record_outcome("server killed (SIGKILL) mid-run, restarted",
                   "stopped (exit 2): the target stopped answering" if killed_midway else "completed first",
                   "completed (exit 0)", recs, "no query counted while it was down")


def test_not_ready_or_mismatched_server_is_one_clear_error_before_any_work(files, proxy, tmp_path):
    d, _ = files
    proxy.ready = False
    res = explain(files, proxy.url("cnn"), tmp_path / "a")
    assert res.exit_code == 2 and "not ready" in res.output
    proxy.ready = True
    np.savez(d / "eleven.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4),
             classes=np.array([str(i) for i in range(11)]))
    sur = d / "sur11.th"
    save_random_surrogate(sur, 11, with_classes=False)
    res = CliRunner().invoke(app, ["explain", "--mode", "black-box", "--surrogate", str(sur), "--model",
                                   proxy.url("cnn"), "--data", str(d / "eleven.npz"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "returns 10 scores per image but the data set has 11 classes" in res.output
    res = explain(files, proxy.url("nope"), tmp_path / "c")
    assert res.exit_code == 2 and "no such model" in res.output
    assert proxy.requests == []  # no image was sent
    for run in ("a", "b", "c"):
        db = tmp_path / run / "results.sqlite"
        assert not db.exists() or not sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]


def test_token_reaches_the_server_and_never_the_run_folder_or_output(files, proxy, tmp_path, monkeypatch):
    proxy.token = SECRET
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    monkeypatch.delenv("FLIPBACK_SERVER_TOKEN", raising=False)
    monkeypatch.setenv("FLIPBACK_SERVER_TOKEN_FILE", str(token_file))
    out = tmp_path / "run"
    proxy.set_schedule(["ok", "ok", "500"])  # an error message on the way, too
    res = CliRunner().invoke(app, args(files, proxy.url("cnn"), out)[1:], catch_exceptions=False)  # not --quiet
    assert res.exit_code == 0, res.output
    assert proxy.auth_seen and all(a == f"Bearer {SECRET}" for a in proxy.auth_seen)
    assert SECRET not in res.output
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    # A wrong token: one clear error that does not show it; no option takes a token.
    monkeypatch.setenv("FLIPBACK_SERVER_TOKEN", "wrong-" + SECRET)
    res = explain(files, proxy.url("cnn"), tmp_path / "run2")
    assert res.exit_code == 2 and "refused the credentials" in res.output and SECRET not in res.output
    assert "--token" not in CliRunner().invoke(app, ["explain", "--help"]).output
    res = explain(files, proxy.url("cnn").replace("http://", f"http://user:{SECRET}@"), tmp_path / "run3")
    assert res.exit_code == 2 and "no credentials in the server URL" in res.output and SECRET not in res.output


@pytest.mark.parametrize("method", ["minimal", "regions"])
@pytest.mark.parametrize("output", ["scores", "label"])
def test_black_box_minimal_and_regions_against_the_server_match_the_in_process_run(files, server, tmp_path,
                                                                                  method, output):
    """Issue 11: every method runs black-box, also against a real KServe server, with the same
    records and corrected images as the same model run in process."""
    d, onnx = files
    runs = {}
    for where, url in (("server", server.url("cnn")), ("local", str(onnx))):
        out = tmp_path / where
        res = CliRunner().invoke(app, [*args(files, url, out, "--output", output), "--method", method, "--budget", "10"],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        runs[where] = out
    a, b = records(runs["server"]), records(runs["local"])
    assert len(a) == LIMIT and a.keys() == b.keys()
    for i in a:
        for key in ("success", "queries", "pred_after", "l2"):
            assert a[i][key] == b[i][key], (i, key)
        assert 1 <= a[i]["queries"] <= 10
    assert images(runs["server"]) == images(runs["local"])
    summary = json.loads((runs["server"] / "summary.json").read_text())
    assert summary["method"] == method and sum(r["queries"] for r in a.values()) == summary["target_session"]["queries"]
