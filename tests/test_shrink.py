"""Black-box `minimal`: a transfer correction, then shrunk toward the original with target
queries (attacks/shrink.py). Known answers from a linear two-class model, whose smallest
correcting change has a closed form: |margin| / ||w|| along w."""

from __future__ import annotations

import pytest
import torch

from flipback.attacks import FastAttack, MinimalAttack
from flipback.attacks.shrink import _low_frequency, estimate, shrink
from flipback.targets import ModelGuide
from flipback.targets.blackbox import from_module


class Linear(torch.nn.Module):
    """Class-1 logit minus class-0 logit = w . x + b on 1x8x8 images."""

    def __init__(self, w: torch.Tensor, b: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone(), requires_grad=False)
        self.b = b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def problem(n: int = 12, seed: int = 0):
    """Mid-grey images the target gets wrong by 1 to 3 logits, so the box never binds, and the
    exact smallest float change of each (its distance to the target's hyperplane)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, generator=g)
    target = Linear(w)
    x = 0.4 + 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    depth = 1 + 2 * torch.rand(n, generator=g)
    s = target(x)[:, 1]
    x = torch.round((x - ((s + depth)[:, None] * w / w.norm() ** 2).view(n, 1, 8, 8)) * 255) / 255
    y = torch.ones(n, dtype=torch.long)
    exact = -target(x)[:, 1] / w.norm()
    assert (exact > 0).all()
    return x, y, target, exact


def surrogate_of(target: Linear, tilt: float, seed: int = 1) -> Linear:
    """A surrogate whose weights are the target's turned by a random direction of relative size `tilt`."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(64, generator=g)
    return Linear(target.w + tilt * target.w.norm() * noise / noise.norm())


def l2(r, x):
    return (r.corrected - x).flatten(1).norm(dim=1)


@pytest.mark.parametrize("output", ["scores", "label"])
def test_with_a_perfect_surrogate_the_change_nears_the_exact_minimum(output):
    x, y, target, exact = problem()
    oracle = from_module(target, 2, output=output)
    fast = FastAttack().run(from_module(target, 2, output=output), ModelGuide(target, 2), x, y)
    r = MinimalAttack().run(oracle, ModelGuide(target, 2), x, y)
    assert r.success.all() and fast.success.all()
    # Verified on exactly the returned 8-bit images, within the default black-box budget.
    assert (target(r.corrected).argmax(1) == 1).all()
    assert torch.equal(r.corrected, torch.round(r.corrected * 255) / 255)
    assert (r.queries <= 20).all() and oracle.ledger.queries == int(r.queries.sum())
    # Transfer overshoots by design (4 logits of surrogate margin); shrinking comes close to
    # the exact minimum, which no 8-bit image can beat.
    assert (l2(fast, x) > 1.5 * exact).all()
    assert (l2(r, x) >= exact - 1e-6).all()
    assert (l2(r, x) <= 1.15 * exact + 2 / 255).all(), (l2(r, x) / exact).tolist()


def detoured_call(output: str, guide_model, n: int = 12, seed: int = 2, budget: int = 30, classes: int = 2):
    """An open call whose verified corrections took a detour: twice the exact distance along
    w, plus as much again along a direction orthogonal to w (so the line search alone cannot
    get below sqrt(2) times the exact minimum). `classes=3`: the target is `ThreeClass`."""
    x, y, target, exact = problem(n=n, seed=seed)
    oracle = from_module(target if classes == 2 else ThreeClass(target), classes, output=output)
    attack = FastAttack()
    call = attack.start(oracle, ModelGuide(guide_model or target, classes), x, y, None, torch.full((n,), budget))
    w = target.w / target.w.norm()
    g = torch.Generator().manual_seed(seed + 10)
    side = torch.randn(n, 64, generator=g)
    side = side - (side @ w)[:, None] * w
    side = side / side.norm(dim=1, keepdim=True)
    change = 2 * exact[:, None] * (w + side)
    xc = torch.round((x.flatten(1) + change).clamp(0, 1) * 255).view_as(x) / 255
    verdict = call.check(torch.arange(n), xc)
    assert verdict.ok.all()
    call.record(torch.arange(n), xc, verdict)
    return call, target, x, exact


@pytest.mark.parametrize("output", ["scores", "label"])
def test_a_detour_is_straightened_by_the_steps_along_the_boundary(output):
    """The line search alone keeps the detour's direction (at best sqrt(2) times the minimum);
    the steps along the boundary, guided by a surrogate whose normal is right, get close to
    the minimum: with scores by the estimated gradient, with labels by the rotations."""
    rows = torch.arange(12)
    line, target, x, exact = detoured_call(output, None)
    shrink(line, rows, line_steps=25, rotate=0)
    assert ((line.corrected - x).flatten(1).norm(dim=1) >= 1.35 * exact).all()
    steps, _, _, _ = detoured_call(output, None)
    if output == "scores":
        estimate(steps, rows, keep=0)
    else:
        shrink(steps, rows, rotate=0.5)
    got = (steps.corrected - x).flatten(1).norm(dim=1)
    assert steps.success.all() and (target(steps.corrected).argmax(1) == 1).all()
    assert (steps.queries <= 30).all()
    bar = 1.1 if output == "scores" else 1.25
    assert (got <= bar * exact + 2 / 255).all(), (got / exact).tolist()


class ThreeClass(torch.nn.Module):
    """The `Linear` target's two classes plus a third that never wins: logits (0, w . x + b, -1000)."""

    def __init__(self, target: Linear):
        super().__init__()
        self.target = target

    def forward(self, x):
        z = self.target(x)
        return torch.cat([z, torch.full_like(z[:, :1], -1000.0)], 1)


class MisleadingSurrogate(torch.nn.Module):
    """Its strongest rival to the true class 1 is class 0, whose normal `v` is orthogonal to the
    target's `w`; its second, class 2, has the target's normal. Logits (100 - v . x, 0, -w . x)."""

    def __init__(self, w: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.w, self.v = w, v

    def forward(self, x):
        f = x.flatten(1)
        return torch.stack([100 - f @ self.v, torch.zeros(len(f)), -(f @ self.w)], 1)


def test_labels_only_rotations_turn_to_the_next_rival_when_the_first_normal_fails():
    """Labels only, a detour as above, and a surrogate whose strongest rival's normal is useless
    (orthogonal to the target's) while its second rival's is exact: with one rival the rotations
    stay near the line search's sqrt(2) times the minimum; taking the rivals in turn, the second
    normal straightens the detour."""
    rows = torch.arange(12)
    w = problem(n=12, seed=2)[2].w.detach()  # the target of detoured_call's problem
    g = torch.Generator().manual_seed(5)
    v = torch.randn(64, generator=g)
    v = (v - (v @ w) / (w @ w) * w) * w.norm() / v.norm()
    got = {}
    for rivals in (1, 2):
        call, target, x, exact = detoured_call("label", MisleadingSurrogate(w, v), budget=40, classes=3)
        shrink(call, rows, rivals=rivals)
        assert call.success.all() and (target(call.corrected).argmax(1) == 1).all() and (call.queries <= 40).all()
        got[rivals] = (call.corrected - x).flatten(1).norm(dim=1)
    assert (got[1] >= 1.3 * exact).all(), (got[1] / exact).tolist()  # 1.41 to 1.51 seen
    assert (got[2] <= 1.1 * exact + 2 / 255).all(), (got[2] / exact).tolist()  # 1.01 to 1.06 seen


def test_one_rival_is_the_margin_normal():
    """rivals=1 rotates toward the normal of the surrogate's margin, as before the option existed
    (shrink's own default)."""
    rows = torch.arange(12)
    a, _, x, _ = detoured_call("label", None)
    shrink(a, rows, rotate=0.5)
    b, _, _, _ = detoured_call("label", None)
    shrink(b, rows, rotate=0.5, rivals=1)
    assert torch.equal(a.corrected, b.corrected) and torch.equal(a.queries, b.queries)


def test_shrinking_never_loses_a_correction_and_stops_at_the_budget():
    x, y, target, _ = problem(n=10, seed=3)
    oracle, guide = from_module(target, 2), ModelGuide(surrogate_of(target, 0.8), 2)
    attack = FastAttack()
    call = attack.start(oracle, guide, x, y, None, torch.full((10,), 9))
    attack.correct(call, torch.arange(10))
    before = (call.corrected - call.x0).flatten(1).norm(dim=1)
    fixed = call.success.clone()
    assert fixed.all()
    shrink(call, torch.arange(10))
    after = (call.corrected - call.x0).flatten(1).norm(dim=1)
    assert call.success.all() and (after <= before).all() and (after < before).any()
    assert (target(call.corrected).argmax(1) == 1).all()
    assert (call.queries == 9).all() and oracle.ledger.queries == 90  # every query left was spent, none more


def test_the_boundary_strategy_is_still_there():
    x, y, target, _ = problem(n=6, seed=4)
    r = MinimalAttack(black_box="boundary").run(from_module(target, 2), ModelGuide(target, 2), x, y)
    assert r.success.all() and (r.queries <= 40).all()
    with pytest.raises(ValueError, match="black_box"):
        MinimalAttack(black_box="nope")


def test_the_random_directions_belong_to_the_image_not_the_batch():
    a = _low_frequency(torch.tensor([3, 7, 11]), (3, 16, 16), salt=2, device="cpu")
    b = _low_frequency(torch.tensor([11]), (3, 16, 16), salt=2, device="cpu")
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a[2], _low_frequency(torch.tensor([11]), (3, 16, 16), salt=3, device="cpu")[0])


@pytest.mark.parametrize("output", ["scores", "label"])
def test_an_image_gets_the_same_correction_in_any_batch(output):
    """So a resumed run that batches differently repeats itself. With scores, the target's
    own answers differ in the last float bit between batch sizes, and the fitted step can
    round one level differently: the sizes then agree closely, not bit for bit."""
    x, y, target, _ = problem(n=8, seed=5)
    guide = ModelGuide(surrogate_of(target, 0.5), 2)
    ids = torch.arange(40, 48)
    together = MinimalAttack().run(from_module(target, 2, output=output), guide, x, y, ids)
    for i in range(8):
        alone = MinimalAttack().run(from_module(target, 2, output=output), guide, x[i:i + 1], y[i:i + 1], ids[i:i + 1])
        assert bool(alone.success[0]) == bool(together.success[i])
        assert int(alone.queries[0]) == int(together.queries[i])
        if output == "label":
            assert torch.equal(alone.corrected[0], together.corrected[i])
        else:
            assert l2(alone, x[i:i + 1])[0] == pytest.approx(float(l2(together, x)[i]), rel=0.05)


@pytest.mark.parametrize("output", ["scores", "label"])
def test_the_trace_follows_the_kept_answer_query_by_query(output):
    """Each image's trace starts at the transfer success, its L2 never grows, its query
    counts rise within the budget, and it ends at exactly the returned correction."""
    x, y, target, _ = problem()
    oracle = from_module(target, 2, output=output)
    r = MinimalAttack().run(oracle, ModelGuide(target, 2), x, y)
    assert r.trace is not None and len(r.trace) == len(x)
    final = l2(r, x)
    for k, events in enumerate(r.trace):
        queries = [q for q, _ in events]
        sizes = [v for _, v in events if v is not None]
        assert queries == sorted(set(queries)) and 1 <= queries[0] and queries[-1] <= int(r.queries[k])
        assert events[-1][1] == pytest.approx(float(final[k]), abs=1e-5)
        assert all(b <= a + 1e-9 for a, b in zip(sizes, sizes[1:]))
        assert len(sizes) > 1  # the shrinking did make it smaller, query by query
