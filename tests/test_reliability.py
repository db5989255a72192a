"""Bad models and failing targets in full `flipback explain` runs (issue 6).

Whole-run problems are one clear error before any image is explained; problems that strike
one image are recorded against that image, with the queries it really spent, and the run
goes on. A target that stops answering stops the run cleanly, and a resumed run retries what
it could not finish. (Server faults over HTTP: tests/test_reliability_server.py.)
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipback.cli import app
from flipback.errors import RunError
from flipback.runs import explain_run
from flipback.attacks import AttackResult, CorrectiveAttack
from flipback.runs.engine import Engine
from flipback.targets import WhiteBoxTarget
from flipback.store import ImageRecord, RunStore
from flipback.targets.blackbox import TargetError
from random_models import save_random_surrogate

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def records(out):
    rows = sqlite3.connect(out / "results.sqlite").execute("SELECT record FROM results ORDER BY idx").fetchall()
    return [json.loads(r) for (r,) in rows]


class NanWhenBright(torch.nn.Module):
    """A linear model that answers NaN (or +inf, or always) once pixel (0, 0) passes 0.5."""

    def __init__(self, value: float = float("nan"), always: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(784, 10)
        self.value, self.always = value, always

    def forward(self, x):
        out = self.lin(x.flatten(1))
        bad = x[:, 0, 0, 0] > 0.5
        if self.always:
            bad = torch.ones_like(bad)
        return torch.where(bad[:, None], torch.full_like(out, self.value), out)


@pytest.fixture
def data(tmp_path):
    """40 random images with pixel (0, 0) at 127/255, just under the model's NaN line; the
    first three above it, so the model cannot answer for them at all."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    x[:, 0, 0] = 127
    x[:3, 0, 0] = 200
    path = tmp_path / "d.npz"
    np.savez(path, images=x, labels=rng.integers(0, 10, 40))
    return path


def scripted(tmp_path, module, name="m.pt"):
    path = tmp_path / name
    torch.jit.script(module).save(str(path))
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_that_never_answers_is_one_clear_error_before_any_work(value, data, tmp_path):
    model = scripted(tmp_path, NanWhenBright(value, always=True))
    out = tmp_path / "run"
    res = runner.invoke(app, ["explain", "--model", str(model), "--data", str(data), "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "no usable answer for any of the first 40 images" in res.output
    assert "non-finite scores" in res.output
    assert records(out) == []  # nothing was explained


@pytest.mark.parametrize("method", ["fast", "minimal"])
def test_nan_scores_on_some_images_are_recorded_and_the_run_goes_on(method, data, tmp_path):
    model = scripted(tmp_path, NanWhenBright())
    out = tmp_path / "run"
    res = invoke("explain", "--model", model, "--data", data, "--out", out, "--method", method, "--no-figures")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    # NaN on the unmodified image: no prediction, so not an error to explain; counted by reason.
    assert summary["n_unanswered"] == 3 and summary["unanswered_by_reason"] == {"non-finite scores": 3}
    assert "without an answer: 3 images (non-finite scores: 3)" in res.output
    recs = records(out)
    assert {r["index"] for r in recs}.isdisjoint({0, 1, 2})
    assert len(recs) == summary["n_misclassified"] == summary["n_explained"]
    # NaN part-way (a candidate brightened pixel (0, 0)): recorded against the image.
    nan_mid_attack = [r for r in recs if r["error"] and r["error"].startswith("non-finite scores")]
    assert nan_mid_attack and all(not r["success"] and r["queries"] > 0 for r in nan_mid_attack)
    assert summary["n_failed_with_error"] == len(nan_mid_attack)
    assert any(r["success"] for r in recs)  # the other images are explained as usual


CALLABLE = textwrap.dedent('''
    """A black-box target: a fixed linear model; NaN scores once pixel (0, 0) passes 0.5, and a
    log of every image it evaluates."""
    import os
    import numpy as np

    W = np.random.default_rng(1).normal(size=(784, 10)).astype(np.float32) / 10

    def predict(x):
        with open(os.environ["EVAL_LOG"], "a") as f:
            f.write(f"{len(x)}\\n")
        out = x.reshape(len(x), -1) @ W
        out[x[:, 0, 0, 0] > 0.5] = np.nan
        return out
''')


def test_black_box_images_that_fail_keep_the_queries_they_spent(data, tmp_path, monkeypatch):
    """The accountant's counts go into the records, so the records add up to what the target
    evaluated: failed images included (they used to be recorded with 0 queries)."""
    (tmp_path / "nan_target.py").write_text(CALLABLE)
    log = tmp_path / "evals.log"
    monkeypatch.setenv("EVAL_LOG", str(log))
    sur = save_random_surrogate(tmp_path / "sur.th")
    out = tmp_path / "run"
    res = invoke("explain", "--mode", "black-box", "--method", "fast", "--budget", 5, "--surrogate", sur,
                 "--model", f"python:{tmp_path / 'nan_target.py'}:predict", "--data", data, "--out", out,
                 "--no-figures", "--batch-size", 8)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    recs = records(out)
    failed = [r for r in recs if r["error"]]
    assert any(r["error"].startswith("TargetError") and "NaN" in r["error"] for r in failed)
    # The others in a failed batch lost what the batch spent; some ran out of budget on the retry.
    assert all(r["error"].startswith(("TargetError", "BudgetExceeded")) for r in failed)
    assert all(1 <= r["queries"] <= 5 for r in failed)
    assert all(r["queries"] <= 5 for r in recs)  # the per-image budget holds, failures and retries included
    session = summary["target_session"]
    assert sum(r["queries"] for r in recs) == session["queries"]
    evaluated = sum(int(n) for n in log.read_text().split())
    assert evaluated == session["queries"] + session["uncounted"]  # every evaluation is accounted for
    assert summary["n_unanswered"] == 3 and summary["n_to_retry"] == 0


# ------------------------------------------------------------------ a target that stops answering


class _Scripted(CorrectiveAttack):
    """Spends one query per image on the oracle, then fails with fail(id) for some images."""

    def __init__(self, fail):
        super().__init__()
        self.fail = fail

    def run(self, oracle, guide, images, labels, ids=None, **kw):
        oracle.ask(images, ids)
        for i in ids:
            exc = self.fail(int(i))
            if exc is not None:
                raise exc
        n = len(images)
        return AttackResult(images.clone(), torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.long),
                            torch.zeros(n, 3), labels=labels.clone())


def _session(fail):
    """An engine over a one-pixel model whose attack fails for the images that fail(i) names."""
    target = WhiteBoxTarget(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), 3)
    return Engine(target, target, _Scripted(fail))


def _down(i):
    return TargetError("server failed 4 times in a row", transient=True)


def test_one_image_the_target_fails_on_is_recorded_to_retry_two_in_a_row_stop_the_run():
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    idx = np.arange(10, 14)
    engine = _session(lambda i: _down(i) if i == 11 else None)
    result, errors, retry = explain_run._attack_batch(engine, x, y, idx)
    assert result.success.tolist() == [True, False, True, True] and retry == [False, True, False, False]
    assert errors[1].startswith("TargetError")
    # The failed batch's queries stay charged: each image spent 1 in the batch, then 1 alone.
    assert engine.spent(idx).tolist() == [2, 2, 2, 2]
    # A malformed answer is the image's own problem: recorded, not retried.
    bad = lambda i: TargetError("malformed answer") if i == 12 else None  # noqa: E731
    _, errors, retry = explain_run._attack_batch(_session(bad), x, y, idx)
    assert retry == [False] * 4 and errors[2] == "TargetError: malformed answer"
    # The target down for two images in a row: the run stops, cleanly (nothing of the batch is kept).
    with pytest.raises(RunError, match="stopped answering"):
        explain_run._attack_batch(_session(lambda i: _down(i) if i >= 12 else None), x, y, idx)


def _record(index, queries, error, retry):
    return ImageRecord(index=index, name=f"{index}.png", true=0, pred_before=1, pred_after=-1, true_name="a",
                       pred_before_name="b", pred_after_name=None, success=False, queries=queries, error=error,
                       retry=retry)


def test_images_to_retry_are_not_done_and_keep_their_queries(tmp_path):
    with RunStore.open(tmp_path / "run", {"k": 1}) as store:
        recs = [_record(i, q, e, r)
                for i, q, e, r in ((0, 2, None, False), (1, 3, "TargetError: down", True), (2, 1, "bad", False))]
        store.add(recs, np.zeros((3, 2, 2, 1), np.uint8), np.zeros((3, 2, 2, 1), np.uint8), 0.1)
        assert store.done() == {0, 2} and store.to_retry() == {1: 3}
        store.add([_record(1, 4, None, False)], np.zeros((1, 2, 2, 1), np.uint8),
                  np.zeros((1, 2, 2, 1), np.uint8), 0.1)
        assert store.done() == {0, 1, 2} and store.to_retry() == {}


# ------------------------------------------------------------------ memory


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_a_memory_mapped_data_set_keeps_resident_memory_flat(tmp_path):
    """A pass over the decode cache (finding the errors) must not leave every page of it
    resident: 96 MB of 64x64 RGB images here, read 256 at a time."""
    from flipback.data import Dataset

    path = tmp_path / "images.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(8000, 64, 64, 3))
    arr[:] = 7
    arr.flush()
    del arr
    images = np.load(path, mmap_mode="r")
    ds = Dataset(images, np.zeros(len(images), np.int64), ["a"], [str(i) for i in range(len(images))])
    start, peak, total = _rss_mib(), 0.0, 0
    for _, batch in ds.batches(256):
        total += int(batch[:, 0, 0, 0].sum())
        peak = max(peak, _rss_mib() - start)
    assert total == 7 * len(images)
    print(f"resident memory grew by {peak:.1f} MiB reading a 96 MiB cache")
    assert peak < 24, f"resident memory grew by {peak:.0f} MiB reading a 96 MiB cache"
