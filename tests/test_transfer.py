"""The corrective attacks in black-box mode (a surrogate guide) on scripted targets whose query
needs are known exactly."""

import numpy as np
import pytest
import torch

from flipback.attacks import FastAttack, PaperAttack
from flipback.targets import ModelGuide
from flipback.targets.blackbox import from_module
from flipback.targets.surrogate import as_probabilities, load_surrogate, save_surrogate, train_surrogate


class Scripted(torch.nn.Module):
    """Two classes; the class-1 logit minus the class-0 logit is 255 * sum(x) - bias, so one
    signed step of 1/255 on every one of the 16 pixels raises the margin of class 1 by 16."""

    def __init__(self, bias: float):
        super().__init__()
        self.bias = bias

    def forward(self, x):
        s = 255 * x.flatten(1).sum(1) - self.bias
        return torch.stack([torch.zeros_like(s), s], 1)


def images_needing(steps):
    """Images (1x4x4, mid-grey) of class 1 whose margin is -(16 * k - 8): k steps needed."""
    base = 127 / 255
    bias = 255 * 16 * base
    x = torch.full((len(steps), 1, 4, 4), base)
    # Lower the sum so that exactly k steps of +16 are needed: margin = -16k + 8.
    offsets = torch.tensor([16 * k - 8 for k in steps], dtype=torch.float32)
    x[:, 0, 0, 0] -= offsets / 255
    return x, torch.ones(len(steps), dtype=torch.long), Scripted(bias)


@pytest.mark.parametrize("output", ["scores", "label"])
def test_paper_method_spends_exactly_the_steps_it_needs(output):
    steps = [1, 3, 2, 5, 1]
    x, y, model = images_needing(steps)
    target = from_module(model, 2, output=output)
    r = PaperAttack().run(target, ModelGuide(model, 2), x, y, torch.arange(len(x)))
    assert r.success.all()
    assert r.queries.tolist() == steps
    assert target.queries == sum(steps)
    assert target.queries_for(torch.arange(len(x))).tolist() == steps


@pytest.mark.parametrize("output", ["scores", "label"])
def test_fast_method_needs_one_query_when_the_surrogate_is_exact(output):
    x, y, model = images_needing([1, 4, 2, 7])
    target = from_module(model, 2, output=output)
    r = FastAttack().run(target, ModelGuide(model, 2), x, y, torch.arange(len(x)))
    assert r.success.all() and r.queries.tolist() == [1, 1, 1, 1] and target.queries == 4
    on_grid = torch.round(r.corrected * 255) / 255
    assert torch.equal(on_grid, r.corrected)


@pytest.mark.parametrize("output, expected", [("label", 3), ("scores", 2)])
def test_fast_method_raises_its_wanted_margin_until_the_target_agrees(output, expected):
    # The surrogate is biased: its margin is the target's plus 40. Images need 3 steps (target
    # margin -40, surrogate margin 0); each step adds 16 to both.
    x, y, target_model = images_needing([3, 3])
    surrogate = Scripted(target_model.bias - 40)
    target = from_module(target_model, 2, output=output)
    r = FastAttack(confidence=4.0, direction="sign").run(target, ModelGuide(surrogate, 2), x, y, torch.arange(len(x)))
    # Wanted surrogate margins: 4 (one step: surrogate 16, target -24: wrong). Labels only: then
    # max(2*4, 16+4) = 20 (surrogate 32, target -8: wrong), then max(40, 36) = 40 (surrogate 48,
    # target 8: right), 3 queries. With scores the target's gap of 24 is added: 20 + 24 = 44,
    # reached at surrogate 48 (target 8), 2 queries.
    assert r.success.all()
    assert r.queries.tolist() == [expected, expected]
    assert target.queries == 2 * expected


def test_per_image_budget_is_never_exceeded():
    x, y, model = images_needing([3, 9])
    target = from_module(model, 2, output="scores", per_image_budget=4)
    r = PaperAttack(max_steps=4).run(target, ModelGuide(model, 2), x, y, torch.arange(2))
    assert r.success.tolist() == [True, False]
    assert r.queries.tolist() == [3, 4] and target.queries_for(torch.arange(2)).tolist() == [3, 4]


def test_surrogate_learns_a_simple_target_from_its_answers(tmp_path):
    from flipback.data import Dataset

    rng = np.random.default_rng(0)
    n = 800
    images = rng.integers(0, 176, (n, 8, 8, 1), dtype=np.uint8)
    left = rng.random(n) < 0.5  # a brighter half, chosen at random: learnable, not trivial
    images[left, :, :4] += 80
    images[~left, :, 4:] += 80
    labels = np.zeros(n, dtype=np.int64)  # the surrogate never sees labels

    class Bright(torch.nn.Module):  # class 1 when the left half is brighter than the right
        def forward(self, x):
            d = 20 * (x[..., :4].mean((1, 2, 3)) - x[..., 4:].mean((1, 2, 3)))
            return torch.stack([-d, d], 1)

    ds = Dataset(images, labels, ["a", "b"], [f"i{i}" for i in range(n)], source="mem", fingerprint="x")
    target = from_module(Bright(), 2, output="scores", budget=600)
    s = train_surrogate(target, ds, 600, members="cnn8", epochs=30, flip=False)
    assert target.queries == 600 and s.meta["queries"] == 600 and s.meta["output"] == "scores"
    assert s.meta["agreement"] >= 0.8
    path = save_surrogate(s, tmp_path / "s.th")
    again = load_surrogate(path)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(again.module(x), s.module(x))


def test_ensemble_members_share_the_answers_and_average_their_logits(tmp_path):
    from flipback.data import Dataset
    from flipback.targets.surrogate import SurrogateEnsemble

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8)
    ds = Dataset(images, np.zeros(120, dtype=np.int64), ["a", "b"], [f"i{i}" for i in range(120)],
                 source="mem", fingerprint="y")
    target = from_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), 2, output="label",
                         budget=100)
    s = train_surrogate(target, ds, 100, members="cnn8,resnet8", epochs=2, flip=False)
    # Both members learn from the same 100 answers: more members cost training time, not queries.
    assert target.queries == 100 and s.meta["queries"] == 100
    assert s.meta["members"] == ["cnn8", "resnet8"] and len(s.meta["member_agreement"]) == 2
    assert isinstance(s.module, SurrogateEnsemble)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        mean = (s.module.members[0](x) + s.module.members[1](x)) / 2
        assert torch.allclose(s.module(x), mean)
        assert torch.allclose(load_surrogate(save_surrogate(s, tmp_path / "e.th")).module(x), mean)


def test_a_surrogate_file_from_before_ensembles_still_loads(tmp_path):
    from flipback.targets.surrogate import build_member

    net = build_member("cnn8", 3, 1).eval()
    meta = {"arch": "surrogate_cnn", "width": 8, "num_classes": 3, "input_shape": [1, 8, 8], "queries": 0,
            "held_out": 0, "agreement": 0.0, "output": "scores"}
    torch.save({"state_dict": net.state_dict(), "meta": meta}, tmp_path / "old.th")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_surrogate(tmp_path / "old.th").module(x), net(x))


@pytest.mark.parametrize("bad", ["", "vgg16", "cnn2", "resnet10", "resnet2", "cnn32,,resnet"])
def test_unknown_surrogate_members_are_refused_by_name(bad):
    from flipback.errors import FlipbackError
    from flipback.targets.surrogate import parse_members

    with pytest.raises(FlipbackError) as err:
        parse_members(bad)
    assert "member" in err.value.args[0] and "resnetD" in err.value.hint


def test_scores_are_read_as_probabilities_or_logits():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert torch.equal(as_probabilities(p), p)
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    assert torch.allclose(as_probabilities(logits), torch.softmax(logits, 1))
