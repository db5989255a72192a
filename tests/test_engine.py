"""The one engine: every method against (oracle, guide) in both modes, budgets that hold in
mixed batches, re-entrant attacks, typed records, and run configs that rebuild in another
process."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import sqlite3
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flipback.attacks import ATTACKS, methods_table
from flipback.cli import app
from flipback.runs.engine import build_engine
from flipback.runs.explain_run import ExplainConfig
from flipback.store import SCHEMA_VERSION, ImageRecord
from flipback.targets import ModelGuide, WhiteBoxTarget
from flipback.targets.blackbox import from_module
from flipback.targets.zoo import SmallCNN

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


class Linear(torch.nn.Module):
    """Two classes on 1x6x6 images: the class-1 logit minus the class-0 logit is w . x - b,
    with fixed weights, so images need changes of very different sizes."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(36, generator=g), requires_grad=False)

    def forward(self, x):
        s = x.flatten(1) @ self.w
        return torch.stack([torch.zeros_like(s), s], 1)


def mixed_batch(n: int, seed: int):
    """Images of class 1 the model gets wrong, some by a hair, some by a lot: a mixed batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    model = Linear()
    s = model(x)[:, 1]
    # Shift each image's margin to -depth along the weights, depth between 0.05 and 6 logits.
    depth = 0.05 + 6 * torch.rand(n, generator=g)
    w = model.w / model.w.norm() ** 2
    x = (x - ((s + depth)[:, None] * w).view(n, 1, 6, 6)).clamp(0, 1)
    return x, torch.ones(n, dtype=torch.long), model


def oracle_and_guide(mode: str, output: str, model):
    if mode == "white-box":
        t = WhiteBoxTarget(model, 2)
        return t, t
    return from_module(model, 2, output=output), ModelGuide(model, 2)


def make(name: str, budget: int):
    options = {"max_steps" if name == "paper" else "max_queries": budget}
    if name == "regions":
        options.update(segmentation="grid", n_segments=9)
    return ATTACKS[name](**options)


def test_one_registry_lists_every_method_in_both_modes():
    assert methods_table() == {m: ("white-box", "black-box") for m in ("paper", "fast", "minimal", "regions")}


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("mode, output", [("white-box", "scores"), ("black-box", "scores"), ("black-box", "label")])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(0, 30), n=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_no_image_ever_exceeds_its_budget(name, mode, output, budget, n, seed):
    x, y, model = mixed_batch(n, seed)
    oracle, guide = oracle_and_guide(mode, output, model)
    ids = torch.arange(100, 100 + n)
    r = make(name, budget).run(oracle, guide, x, y, ids)
    spent = oracle.ledger.spent(ids)
    assert (spent <= budget).all(), (spent.tolist(), budget)
    assert oracle.ledger.queries == int(spent.sum())  # the total is the sum of the per-image counts
    assert r.queries.tolist() == spent.tolist()  # the attack's own count agrees with the oracle's
    # Every success is verified on exactly the returned image.
    if r.success.any():
        assert (model(r.corrected[r.success]).argmax(1) == 1).all()


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("mode", ["white-box", "black-box"])
def test_one_attack_object_serves_two_threads(name, mode):
    x, y, model = mixed_batch(6, 7)
    attack = make(name, 25)

    def call(xb, yb, ids):
        oracle, guide = oracle_and_guide(mode, "scores", model)
        return attack.run(oracle, guide, xb, yb, ids)

    halves = [(x[:3], y[:3], torch.arange(3)), (x[3:], y[3:], torch.arange(3, 6))]
    one_after_other = [call(*h) for h in halves]
    together = [None, None]
    barrier = threading.Barrier(2)

    def worker(k):
        barrier.wait()
        together[k] = call(*halves[k])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(one_after_other, together):
        assert torch.equal(a.corrected, b.corrected) and torch.equal(a.success, b.success)
        assert torch.equal(a.queries, b.queries) and torch.equal(a.labels, b.labels)
    assert not any(k.startswith("_") for k in vars(attack))  # no working state left on the object


def test_label_only_records_store_the_answered_label():
    x, y, model = mixed_batch(5, 1)
    oracle, guide = oracle_and_guide("black-box", "label", model)
    r = make("fast", 10).run(oracle, guide, x, y)
    truth = model(r.corrected).argmax(1)
    assert torch.isnan(r.logits).all()  # a hard-label target gives no scores...
    assert torch.equal(r.answered(), truth)  # ...but its answer is kept


class Spy(WhiteBoxTarget):
    """Records every uncounted evaluation."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.free_inputs = []

    def logits(self, x):
        self.free_inputs.append(x.detach().clone())
        return super().logits(x)

    def gradients(self, x, *a, **k):
        self.free_inputs.append(x.detach().clone())
        return super().gradients(x, *a, **k)

    def predict(self, x, *, counted=True, ids=None):
        self._count(ids, len(x), counted)
        if not counted:
            self.free_inputs.append(x.detach().clone())
        return ModelGuide.logits(self, x)

    def gradient(self, x, labels, objective, *, counted=True, need_grad=None, ids=None):
        self._count(ids, len(x), counted)
        if not counted:
            self.free_inputs.append(x.detach().clone())
        return ModelGuide.gradients(self, x, labels, objective, need_grad)


def test_regions_evaluates_nothing_modified_for_free():
    """White-box, every evaluation of a modified image is a counted query: the free ones are
    all on unmodified images (the regions' effects re-measured on top of the correction reuse
    the answer already paid for)."""
    x, y, model = mixed_batch(4, 2)
    spy = Spy(model, 2)
    r = make("regions", 250).run(spy, spy, x, y)
    assert r.success.any()
    originals = torch.round(x * 255) / 255
    for batch in spy.free_inputs:
        for img in batch:
            assert any(torch.equal(img, o) for o in originals), "an uncounted evaluation of a modified image"
    assert spy.ledger.queries == int(r.queries.sum())


def test_records_carry_a_schema_and_old_rows_migrate():
    old = {"index": 3, "name": "a.png", "true": 1, "pred_before": 0, "pred_after": 1, "true_name": "b",
           "pred_before_name": "a", "pred_after_name": "b", "success": True, "queries": 2, "l2": 0.1,
           "linf": 0.01, "l0": 4, "frac_changed": 0.0, "regions": [], "n_regions": 0, "region_fraction": 0.0,
           "scores_before": [0.6, 0.4], "scores_after": [0.4, 0.6], "figure": None, "corrected_image": None,
           "error": None}
    rec = ImageRecord.from_dict(old)
    assert rec.schema == SCHEMA_VERSION and rec.retry is False and rec.queries == 2
    assert ImageRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    net = SmallCNN(10)
    ckpt = tmp_path / "net.th"
    torch.save({"state_dict": net.state_dict()}, ckpt)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 40))
    return ckpt, data


def _rebuild_and_run(blob: bytes):
    cfg = pickle.loads(blob)
    from flipback.data import load_dataset
    from flipback.runs.errors import to_tensor

    ds = load_dataset(cfg.data)
    engine = build_engine(cfg, ds.num_classes, ds.shape)
    idx = np.arange(6)
    r = engine.run(to_tensor(ds.images[idx]), torch.from_numpy((ds.labels[idx] + 1) % 10), idx)
    return r.corrected.numpy(), r.queries.numpy()


def test_a_run_config_pickles_and_rebuilds_the_same_engine_in_another_process(tiny):
    ckpt, data = tiny
    cfg = ExplainConfig(model=f"small_cnn:{ckpt}", data=str(data), method="minimal", budget=12)
    blob = pickle.dumps(cfg)
    here = _rebuild_and_run(blob)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = pool.apply(_rebuild_and_run, (blob,))
    assert np.array_equal(here[0], there[0]) and np.array_equal(here[1], there[1])


@pytest.mark.parametrize("method", ["minimal", "regions"])
@pytest.mark.parametrize("output", ["scores", "label"])
def test_black_box_minimal_and_regions_run_end_to_end(tiny, tmp_path, method, output):
    ckpt, data = tiny
    sur = tmp_path / "sur.th"
    res = invoke("--quiet", "surrogate", "--target", f"small_cnn:{ckpt}", "--data", data, "--budget", 30,
                 "--epochs", 1, "--members", "cnn8", "--output", output, "--out", sur)
    assert res.exit_code == 0, res.output
    out = tmp_path / "bb"
    res = invoke("--quiet", "explain", "--mode", "black-box", "--model", f"small_cnn:{ckpt}", "--data", data,
                 "--surrogate", sur, "--output", output, "--method", method, "--budget", 12, "--limit", 4,
                 "--no-figures", "--out", out)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["mode"] == "black-box"
    rows = [json.loads(r) for (r,) in sqlite3.connect(out / "results.sqlite").execute("SELECT record FROM results")]
    assert len(rows) == 4 and all(1 <= r["queries"] <= 12 for r in rows)
    assert sum(r["queries"] for r in rows) == summary["target_session"]["queries"]
    for r in rows:
        assert r["schema"] == SCHEMA_VERSION
        if r["success"]:
            assert r["pred_after"] == r["true"]


def test_devices_resolve_or_fail_with_one_clear_message():
    from flipback.errors import FlipbackError
    from flipback.targets.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(FlipbackError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(FlipbackError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_summary_keeps_a_large_confusion_as_its_nonzero_cells():
    from flipback.runs.errors import DENSE_CONFUSION, Predictions

    labels = np.array([0, 0, 1, 2, 2, 2, 5])
    predicted = np.array([0, 3, 1, 4, 4, 2, -1])  # the last one unanswered: left out
    small = Predictions(labels, predicted).confusion_summary(10)
    assert set(small) == {"confusion"} and np.array(small["confusion"]).sum() == 6
    assert small["confusion"][2][4] == 2
    big = Predictions(labels, predicted).confusion_summary(DENSE_CONFUSION + 900)
    assert big == {"confusion_pairs": [[2, 4, 2], [0, 0, 1], [0, 3, 1], [1, 1, 1], [2, 2, 1]]}
