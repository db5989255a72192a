"""adv-lib anchors (benchmarks/advlib_baselines.py) on a linear model whose minimum-norm
correction is known in closed form. `make test` installs adv-lib (and foolbox, for the shared
8-bit judging); without them this module skips."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("foolbox")
pytest.importorskip("adv_lib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from advlib_baselines import ATTACKS, GRADIENTS, run_advlib  # noqa: E402

N, C, H = 6, 3, 4
D = C * H * H


@pytest.fixture(scope="module")
def linear():
    """Ten classes; only class 0 (the truth) and class 1 (the wrong answer) can win: the
    others' biases are 10 below. (Not 100: ALMA's and APGD's DLR loss divides by the spread of
    the top logits, and with 100 ALMA stopped 2 to 6 times above the minimum.) The smallest L2 change that makes class 0 win is the
    distance to the hyperplane between them, (z1 - z0) / ||w1 - w0||, as long as the box
    [0, 1] is not reached (images near 0.5, margins small)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(D, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, D, generator=g) * 0.3)
        lin.bias.copy_(torch.tensor([0.0, 0.0] + [-10.0] * 8))
    model = torch.nn.Sequential(torch.nn.Flatten(), lin).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.round((0.5 + 0.05 * torch.randn(N, C, H, H, generator=g)) * 255) / 255
    w = lin.weight[1] - lin.weight[0]
    with torch.no_grad():
        z = lin(x.flatten(1))
        # move each image along w so that class 1 wins by a margin of 0.5 to 1.5
        margin = (z[:, 1] - z[:, 0]).unsqueeze(1)
        want = 0.5 + torch.rand(N, 1, generator=g)
        x = x + ((want - margin) / w.dot(w) * w).view(N, C, H, H)
        x = torch.round(x.clamp(0, 1) * 255) / 255
        z = lin(x.flatten(1))
    assert (z.argmax(1) == 1).all()
    distance = (z[:, 1] - z[:, 0]) / w.norm()
    return model, x, torch.zeros(N, dtype=torch.long), distance


@pytest.mark.parametrize("attack", ATTACKS)
def test_each_anchor_reaches_the_closed_form_minimum(linear, attack):
    model, x, y, distance = linear
    steps = 30 if attack == "apgd-min" else 300
    out = run_advlib(model, x, y, attack, steps=steps, batch_size=4)  # two batches
    assert out["n_images"] == N and out["seconds"] > 0
    assert out["gradients_per_image"] == (steps * 20 if attack == "apgd-min" else steps)
    if attack == "ddn-q":  # quantized in the loop: already 8-bit images
        assert torch.equal(out["x_adv"], torch.round(out["x_adv"] * 255) / 255)
        assert out["success_uint8"].all()
        l2 = out["l2_uint8"]
    else:
        assert out["success_float"].all()
        l2 = out["l2_float"]
    # never below the true minimum (a real correction), and close to it
    assert (l2 >= distance * 0.999).all()
    assert (l2 <= distance * (1.15 if attack == "ddn-q" else 1.05)).all(), (l2 / distance)
    with torch.no_grad():  # the 8-bit successes reported are real
        assert torch.equal(model(out["x_scaled"]).argmax(1) == y, out["success_scaled"])
    assert out["success_scaled"].all()


def test_default_budgets_are_attackbench_s():
    assert GRADIENTS == {"alma": 1000, "fmn": 1000, "ddn": 1000, "ddn-q": 1000, "apgd-min": 2000}


def test_the_placeholders_do_not_outlive_the_import():
    """Other libraries in the same process must still see that torchvision is absent."""
    import importlib.util

    from advlib_baselines import import_adv_lib

    missing = {name for name in ("visdom", "torchvision") if importlib.util.find_spec(name) is None}
    import_adv_lib()
    for name in missing:
        assert name not in sys.modules and importlib.util.find_spec(name) is None
