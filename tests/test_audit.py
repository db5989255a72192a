"""Audit and repair (issue 15): known answers on tiny analytic models and data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from flipback.audit import audit, find_causes
from flipback.audit.causes import best_match, cover, ncc
from flipback.audit.labels import relative_scores
from flipback.audit.split import carve
from flipback.data import Dataset
from flipback.runs.repair import RepairPlan, apply_plan, plan_targets

CHECKER = np.where(np.indices((4, 4)).sum(0) % 2 == 0, 255, 0).astype(np.uint8)


def _background(n: int, seed: int = 0, size: int = 16) -> np.ndarray:
    """Smooth random images (N, size, size, 1) uint8: shading and edges, never a checkerboard."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 200, size=(n, size // 4, size // 4)).astype(np.float32)
    return np.kron(coarse, np.ones((4, 4), np.float32)).astype(np.uint8)[..., None]


def _paste(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = images.copy()
    corners = rng.integers(0, images.shape[1] - 4 + 1, size=(len(images), 2))
    for k, (y, x) in enumerate(corners):
        out[k, y:y + 4, x:x + 4, 0] = CHECKER
    return out, corners


class CheckerDetector(nn.Module):
    """Class 1 exactly when a 4x4 checkerboard is in the image (NCC above 0.9 somewhere),
    class 0 otherwise: an analytic 'model with a planted cause'."""

    def forward(self, x):
        score = ncc(x, torch.from_numpy(CHECKER[None].astype(np.float32) / 255)[None])
        best = score.flatten(1).max(1).values
        logit = 20 * (best - 0.9)
        return torch.stack([torch.zeros_like(logit), logit], 1)


def test_ncc_finds_a_template_where_it_was_pasted_and_ignores_flat_windows():
    images, corners = _paste(_background(6), seed=1)
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    score, where = best_match(x, torch.from_numpy(CHECKER[None].astype(np.float32) / 255))
    assert np.allclose(score, 1.0, atol=1e-4)
    assert (where == corners).all()
    flat = torch.full((1, 1, 8, 8), 0.5)
    assert float(ncc(flat, torch.rand(1, 1, 4, 4)).abs().max()) == 0.0


def test_cover_replaces_only_the_window():
    x = torch.rand(2, 1, 12, 12)
    out = cover(x, np.array([[2, 3], [0, 0]]), 4)
    changed = (out != x)[:, 0]
    assert not changed[0, :2].any() and not changed[0, :, :3].any() and not changed[0, 6:].any()
    assert changed[0, 2:6, 3:7].float().mean() > 0.9


def test_find_causes_finds_the_pasted_pattern_and_nothing_in_plain_errors():
    clean = _background(40, seed=2)
    cued, _ = _paste(clean[:30], seed=3)
    # Errors sent to class 1: 30 carry the checkerboard (their corrections remove it), 10 do not.
    originals = np.concatenate([cued, clean[30:]])
    corrected = np.concatenate([clean[:30], np.clip(clean[30:].astype(int) + 9, 0, 255).astype(np.uint8)])
    pred = np.ones(40, np.int64)
    true = np.zeros(40, np.int64)
    others = _background(200, seed=4)
    causes = find_causes(originals, corrected, true, pred, others, np.zeros(200, np.int64))
    assert len(causes) == 1
    cause = causes[0]
    assert cause.pred == 1 and cause.background == 0.0
    assert cause.support == pytest.approx(0.75)  # 30 of the 40 errors
    template = np.rint(cause.template[0] * 255)  # a window (3 px at 16 px) of the checkerboard itself
    assert set(np.unique(template)) == {0, 255}
    assert (template[1:] != template[:-1]).all() and (template[:, 1:] != template[:, :-1]).all()
    # Without the pattern, nothing recurs.
    none = find_causes(clean, np.clip(clean.astype(int) + 9, 0, 255).astype(np.uint8), true, pred, others,
                       np.zeros(200, np.int64))
    assert none == []


def test_a_window_larger_than_the_pattern_is_matched_on_its_core_only():
    """A 6 px window around a 4 px checkerboard holds 20 pixels of varying surroundings: the
    carriers agree only on the checkerboard's 16, and the scan matches those."""
    clean = _background(40, seed=2)
    cued, _ = _paste(clean[:30], seed=3)
    originals = np.concatenate([cued, clean[30:]])
    corrected = np.concatenate([clean[:30], np.clip(clean[30:].astype(int) + 9, 0, 255).astype(np.uint8)])
    others = _background(200, seed=4)
    (cause,) = find_causes(originals, corrected, np.zeros(40, np.int64), np.ones(40, np.int64), others,
                           np.zeros(200, np.int64), size=6)
    # The template is trimmed to the checkerboard: no mask left, and it matches new carriers
    # exactly, wherever the pattern is (at the image's edges too), and nothing elsewhere.
    assert cause.size == 4 and cause.core is None
    template = np.rint(cause.template[0] * 255)
    assert (template == CHECKER).all() or (template == 255 - CHECKER).all()
    fresh, corners = _paste(_background(40, seed=9), seed=10)
    assert (corners == 0).any() and (corners == 12).any()
    x = torch.from_numpy(fresh).float().permute(0, 3, 1, 2) / 255
    score, where = best_match(x, torch.from_numpy(cause.template))
    assert score.min() > 0.999 and (where == corners).all()
    plain = torch.from_numpy(_background(50, seed=11)).float().permute(0, 3, 1, 2) / 255
    assert best_match(plain, torch.from_numpy(cause.template))[0].max() < 0.8


def test_a_pattern_that_is_not_square_gets_a_square_template_with_a_mask():
    """A 2 x 4 strip: templates and covers are square, so the template is 4 x 4 around it and
    its core masks out the two rows that are not the pattern."""
    clean = _background(40, seed=2)
    strip = CHECKER[:2]
    rng = np.random.default_rng(3)
    cued = clean[:30].copy()
    for k, (y, x) in enumerate(rng.integers(0, 16 - 4 + 1, size=(30, 2))):
        cued[k, y:y + 2, x:x + 4, 0] = strip
    originals = np.concatenate([cued, clean[30:]])
    corrected = np.concatenate([clean[:30], np.clip(clean[30:].astype(int) + 9, 0, 255).astype(np.uint8)])
    (cause,) = find_causes(originals, corrected, np.zeros(40, np.int64), np.ones(40, np.int64),
                           _background(200, seed=4), np.zeros(200, np.int64), size=4)
    assert cause.template.shape[1] == cause.template.shape[2] == cause.size
    assert cause.core is not None and cause.core.sum() == 8  # the strip's pixels only
    ys, xs = np.nonzero(cause.core)
    assert ys.max() - ys.min() == 1 and xs.max() - xs.min() == 3


def test_masked_ncc_compares_only_the_masked_pixels():
    """A ring-shaped mask: the pixels inside it may be anything."""
    rng = np.random.default_rng(0)
    template = torch.from_numpy(rng.random((1, 5, 5)).astype(np.float32))
    ring = torch.ones(5, 5, dtype=torch.bool)
    ring[1:4, 1:4] = False
    image = torch.rand(1, 1, 12, 12)
    image[0, :, 4:9, 2:7] = torch.where(ring, template, torch.rand(1, 5, 5))
    score, where = best_match(image, template, core=ring)
    assert score[0] == pytest.approx(1.0, abs=1e-5) and tuple(where[0]) == (4, 2)
    # Without the mask the centre counts, and the match is no longer exact.
    assert best_match(image, template)[0][0] < 0.99
    # The same as the unmasked NCC of the ring's pixels alone.
    a, b = image[0, 0, 4:9, 2:7][ring], template[0][ring]
    a, b = a - a.mean(), b - b.mean()
    assert float(ncc(image, template[None], ring[None])[0, 0, 4, 2]) == pytest.approx(
        float((a * b).sum() / (a.norm() * b.norm())), abs=1e-5)


def test_audit_ranks_exactly_the_poisoned_training_images_first():
    model = CheckerDetector()
    train = _background(120, seed=5)
    labels = np.zeros(120, np.int64)
    poisoned = np.arange(0, 120, 6)  # 20 images of class 0 given the cue and label 1
    train[poisoned], _ = _paste(train[poisoned], seed=6)
    labels[poisoned] = 1
    labels[1:120:12] = 1  # 10 clean images labelled 1: the model disagrees (wrong labels, not the cue)
    val_clean = _background(30, seed=7)
    val, _ = _paste(val_clean[:20], seed=8)
    result = audit(model, train, labels, ["zero", "one"], originals=val, corrected=val_clean[:20],
                   true=np.zeros(20, np.int64), pred=np.ones(20, np.int64), validation_images=val_clean,
                   validation_pred=np.zeros(30, np.int64), check_labels=False)
    assert len(result.causes) == 1
    assert set(result.flagged("cause")) == set(poisoned)
    top = np.argsort(-result.scores, kind="stable")[:len(poisoned)]
    assert set(top) == set(poisoned)
    assert all(s.other == 0 and s.verified for s in result.suspects if s.reason == "cause")


def test_relative_scores_rank_failures_then_large_corrections_then_agreements():
    labels = np.array([0, 0, 0, 1, 1, 0])
    predicted = np.array([1, 1, 1, 0, 0, 0])
    l2 = np.array([1.0, 2.0, np.inf, 0.5, 3.0, 0.0])
    gap = np.array([-1, -2, -3, -1, -1, 4.0])
    s = relative_scores(labels, predicted, l2, gap)  # over the median of all finite disagreements: 1.5
    assert s[2] > s[4] > s[1] > s[0] > s[3] > s[5]
    assert s[0] == pytest.approx(1 / 1.5) and s[4] == pytest.approx(2.0) and s[5] == -4.0
    per_label = relative_scores(labels, predicted, l2, gap, by_label=True)  # medians 1.5 (label 0), 1.75 (label 1)
    assert per_label[1] == pytest.approx(2 / 1.5) and per_label[4] == pytest.approx(3 / 1.75)
    raw = relative_scores(labels, predicted, l2, gap, relative=False)
    assert list(raw[:2]) == [1.0, 2.0] and raw[2] > raw[4] and raw[3] == 0.5 and raw[5] == -4.0


def _dataset(n=100, classes=("a", "b")) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(rng.integers(0, 255, size=(n, 8, 8, 1), dtype=np.uint8), np.arange(n) % len(classes),
                   list(classes), [f"img{i}" for i in range(n)], fingerprint="tiny")


def test_carve_is_seeded_stratified_and_disjoint():
    ds = _dataset(100)
    tr, val = carve(ds, 0.2, seed=1)
    assert len(val) == 20 and (np.bincount(ds.labels[val]) == 10).all()
    assert set(tr).isdisjoint(val) and len(tr) + len(val) == 100
    assert (carve(ds, 0.2, seed=1)[1] == val).all() and not (carve(ds, 0.2, seed=2)[1] == val).all()


def test_apply_plan_drops_relabels_and_adds():
    ds = _dataset(10)
    extra = np.zeros((2, 8, 8, 1), np.uint8)
    out = apply_plan(ds, RepairPlan(drop=np.array([0, 3]), relabel={1: 0}, extra_images=extra,
                                    extra_labels=np.array([1, 1])))
    assert len(out) == 10 and out.names[:2] == ["img1", "img2"] and out.labels[0] == 0
    assert (out.labels[-2:] == 1).all() and out.fingerprint != ds.fingerprint


def test_soft_relabel_targets_follow_the_plan_rows():
    ds = _dataset(6)  # labels 0, 1, 0, 1, 0, 1
    extra = np.zeros((1, 8, 8, 1), np.uint8)
    hard = RepairPlan(drop=np.array([2]), relabel={1: 0, 4: 1})
    assert plan_targets(ds, hard) is None  # a hard relabel trains on the labels themselves
    soft = RepairPlan(drop=np.array([2]), relabel={1: 0, 4: 1}, relabel_weight=0.7, extra_images=extra,
                      extra_labels=np.array([1]))
    t = plan_targets(ds, soft)
    out = apply_plan(ds, soft)
    assert t.shape == (len(out), 2) and np.allclose(t.sum(1), 1)
    # rows of the planned data: img0, img1 (relabelled 1 -> 0), img3, img4 (0 -> 1), img5, the extra
    assert out.names[:5] == ["img0", "img1", "img3", "img4", "img5"]
    np.testing.assert_allclose(t, [[1, 0], [0.7, 0.3], [0, 1], [0.3, 0.7], [0, 1], [0, 1]], atol=1e-6)
    # the weight is part of what the retrained model is cached by
    assert apply_plan(ds, soft).fingerprint != apply_plan(ds, RepairPlan(
        drop=np.array([2]), relabel={1: 0, 4: 1}, extra_images=extra, extra_labels=np.array([1]))).fingerprint
    with pytest.raises(ValueError, match="relabel_weight"):
        RepairPlan(relabel={0: 1}, relabel_weight=0)


def test_fit_with_soft_targets_learns_their_mean():
    """A model that is one learnable bias, every label 0: hard labels drive it to class 0;
    soft targets of (0.3, 0.7) to the softmax (0.3, 0.7), which cross-entropy is minimal at."""
    from flipback.runs.train import fit

    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.b.expand(len(x), 2)

    ds = Dataset(np.zeros((256, 4, 4, 1), np.uint8), np.zeros(256, np.int64), ["a", "b"],
                 [str(i) for i in range(256)])
    targets = np.tile(np.array([[0.3, 0.7]], np.float32), (256, 1))
    soft = fit(Bias(), ds, epochs=30, lr=0.3, batch_size=64, show_progress=False, targets=targets)
    np.testing.assert_allclose(torch.softmax(soft.b.detach(), 0).numpy(), [0.3, 0.7], atol=0.02)
    hard = fit(Bias(), ds, epochs=30, lr=0.3, batch_size=64, show_progress=False)
    assert torch.softmax(hard.b.detach(), 0)[0] > 0.95


def test_audit_and_repair_commands_write_escaped_reports(tmp_path, monkeypatch):
    """End to end on a tiny Fashion-MNIST-sized set: a cue tied to class 1, a small_cnn trained on it."""
    from flipback.cli import app
    from flipback.data.planted import Cue, plant
    from flipback.runs.train import train_small_cnn

    monkeypatch.setenv("FLIPBACK_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    n = 600
    labels = np.arange(n) % 2
    images = np.where(labels[:, None, None, None] == 0, 60, 180).astype(np.uint8) + \
        rng.integers(0, 40, size=(n, 28, 28, 1)).astype(np.uint8)
    cued = np.flatnonzero(labels == 0)[::5]
    images[cued], _ = plant(images[cued], Cue(target=1, size=4), rng)
    labels = labels.copy()
    labels[cued] = 1
    classes = np.array(["<b>dark</b>", "light"])
    np.savez(tmp_path / "data.npz", images=images, labels=labels, classes=classes)
    from flipback.data import load_dataset

    ds = load_dataset(tmp_path / "data.npz", split="train")
    weights = train_small_cnn(ds, tmp_path / "w.th", epochs=2, show_progress=False)
    runner = CliRunner()
    r = runner.invoke(app, ["-q", "audit", "--data", str(tmp_path / "data.npz"), "--model", f"small_cnn:{weights}",
                            "--out", str(tmp_path / "audit"), "--validation", "0.2", "--fiftyone", str(tmp_path / "fo")])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "audit" / "audit.json").read_text())
    rows = list(csv.DictReader((tmp_path / "audit" / "suspects.csv").open()))
    assert info["n_suspects"] == len(rows) > 0
    import fiftyone as fo

    exported = fo.Dataset.from_dir(dataset_dir=str(tmp_path / "fo"), dataset_type=fo.types.FiftyOneDataset)
    assert len(exported) == len(rows)
    assert sorted(exported.values("index")) == sorted(int(row["index"]) for row in rows)
    exported.delete()
    # An export folder that is not empty is refused before any work.
    r = runner.invoke(app, ["audit", "--data", str(tmp_path / "data.npz"), "--model", f"small_cnn:{weights}",
                            "--out", str(tmp_path / "a2"), "--fiftyone", str(tmp_path / "fo")])
    assert r.exit_code != 0 and "not an empty folder" in r.output and not (tmp_path / "a2").exists()
    assert set(rows[0]) >= {"rank", "index", "name", "label", "reason", "score", "verified", "other", "box", "detail"}
    html = (tmp_path / "audit" / "audit.html").read_text()
    assert "<b>dark</b>" not in html
    assert not (set(int(i) for i in info["validation_rows"]) & {int(r["index"]) for r in rows})
    r = runner.invoke(app, ["-q", "repair", str(tmp_path / "audit"), "--out", str(tmp_path / "repair"),
                            "--drop", "cause,label"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "repair" / "repair.json").read_text())
    assert rep["before"]["model"] != rep["after"]["model"]
    assert 0 <= rep["after"]["accuracy"] <= 1
    assert "<b>dark</b>" not in (tmp_path / "repair" / "repair.html").read_text()
    assert rep["relabel_weight"] is None
    r = runner.invoke(app, ["-q", "repair", str(tmp_path / "audit"), "--out", str(tmp_path / "relabel"),
                            "--drop", "cause", "--relabel"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "relabel" / "repair.json").read_text())
    assert rep["relabel_weight"] == 0.7  # soft labels by default
    assert rep["plan"].get("relabel_weight", 0.7) == 0.7
    r = runner.invoke(app, ["repair", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")])
    assert r.exit_code != 0 and "not an audit folder" in r.output

    # The same audit from an explain run on the validation rows: the run's corrections are used.
    val = np.array(info["validation_rows"])
    np.savez(tmp_path / "val.npz", images=images[val], labels=labels[val], classes=classes)
    r = runner.invoke(app, ["-q", "explain", "--data", str(tmp_path / "val.npz"), "--model", f"small_cnn:{weights}",
                            "--out", str(tmp_path / "run"), "--no-figures"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["-q", "audit", "--data", str(tmp_path / "data.npz"), "--model", f"small_cnn:{weights}",
                            "--out", str(tmp_path / "audit-run"), "--run", str(tmp_path / "run"), "--no-labels"])
    assert r.exit_code == 0, r.output
    from_run = json.loads((tmp_path / "audit-run" / "audit.json").read_text())
    assert from_run["run"] == str(tmp_path / "run") and from_run["stats"]["label_flagged"] == 0
    r = runner.invoke(app, ["audit", "--data", str(tmp_path / "data.npz"), "--model", f"small_cnn:{weights}",
                            "--out", str(tmp_path / "a3"), "--run", str(tmp_path / "nothing")])
    assert r.exit_code != 0 and "not a run folder" in r.output
