"""Foolbox baselines (benchmarks/foolbox_baselines.py): only when foolbox is installed."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("foolbox")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for `benchmarks`

import eagerpy as ep  # noqa: E402
from foolbox.attacks import L2FMNAttack  # noqa: E402

from benchmarks.foolbox_baselines import L2FMNFixed, run_foolbox, to_uint8_grid  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)
    ).eval()
    x = to_uint8_grid(torch.rand(8, 3, 8, 8))
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = (pred + 1 + torch.randint(0, 9, (8,))) % 10  # never the prediction: all "misclassified"
    assert (labels != pred).all()
    return model, x, labels


@pytest.mark.parametrize("attack", ["ddn", "fmn", "fmn-fixed"])
def test_run_foolbox_shapes(tiny, attack):
    model, x, labels = tiny
    out = run_foolbox(model, x, labels, attack, steps=30, batch_size=5)  # 2 batches
    n = len(x)
    for k in ("x_adv", "x_round", "x_scaled"):
        assert out[k].shape == x.shape and out[k].device.type == "cpu"
        assert out[k].min() >= 0 and out[k].max() <= 1
    for k in ("success_float", "success_uint8", "success_scaled", "success_foolbox"):
        assert out[k].shape == (n,) and out[k].dtype == torch.bool
    for k in ("x_round", "x_scaled"):
        assert torch.equal(out[k], torch.round(out[k] * 255) / 255)
    for kind in ("float", "uint8", "scaled"):
        l2 = out[f"l2_{kind}"]
        assert l2.shape == (n,)
        assert torch.equal(torch.isnan(l2), ~out[f"success_{kind}"])
    assert torch.equal(torch.isnan(out["scale"]), ~out["success_scaled"])
    assert (out["scale"][out["success_scaled"]] >= 1).all()
    assert (out["success_scaled"] | ~out["success_uint8"]).all()  # s = 1 is tried first
    with torch.no_grad():  # the reported successes are real
        assert torch.equal(model(out["x_scaled"]).argmax(1) == labels, out["success_scaled"])
    assert out["seconds"] > 0 and out["images_per_second"] > 0
    if attack == "ddn":
        assert out["success_float"].float().mean() >= 0.75


def test_fixed_projection_bounds_the_norm():
    torch.manual_seed(1)
    x0 = torch.rand(3, 3, 8, 8)
    delta = torch.randn(3, 3, 8, 8)
    delta = 5 * delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    eps = ep.astensor(torch.ones(3))
    x, x0_ = ep.astensor(x0 + delta), ep.astensor(x0)

    fixed = (L2FMNFixed().project(x, x0_, eps).raw - x0).flatten(1).norm(dim=1)
    assert (fixed <= 1 + 1e-5).all() and (fixed >= 1 - 1e-5).all()

    # foolbox 3.3.4's own L2 projection is a no-op: the norm stays 5.
    orig = (L2FMNAttack().project(x, x0_, eps).raw - x0).flatten(1).norm(dim=1)
    assert (orig > 4.99).all()

    # inside the ball (and with the initial eps = inf) the fixed projection leaves delta alone
    inf = ep.astensor(torch.full((3,), float("inf")))
    assert torch.allclose(L2FMNFixed().project(x, x0_, inf).raw, x0 + delta)
    big = ep.astensor(torch.full((3,), 10.0))
    assert torch.allclose(L2FMNFixed().project(x, x0_, big).raw, x0 + delta)
