"""Known-answer tests for the corrective attacks and the projection they share.

Every expected value here comes from an analytic answer (a linear model, a box-free
projection, a brute-force optimum) or from a model whose behaviour is scripted, never
from a snapshot of what the code returned.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from flipback.attacks import MIN_MARGIN, FastAttack, MinimalAttack, PaperAttack
from flipback.attacks.projection import project_to_halfspace
from flipback.targets import WhiteBoxTarget
from flipback.targets.whitebox import margin


def _wb(model, k):
    """A white-box target is both oracle and guide."""
    t = WhiteBoxTarget(model, k)
    return t, t

STEP = 1 / 255


# --------------------------------------------------------------------------- helpers


class LinearNet(nn.Module):
    """f(x) = W x + b on flattened NCHW images; W (K, n), b (K,)."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("W", W.clone())
        self.register_buffer("b", b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.W.T + self.b


class TinyCNN(nn.Module):
    """Conv-ReLU-Linear on 3x8x8, 4 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def grid(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255) / 255


def on_grid(x: torch.Tensor, tol: float = 1e-6) -> bool:
    return bool(((x - grid(x)).abs() <= tol).all())


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def linear_problem(seed: int = 0, n_images: int = 16, min_dist: float = 0.005):
    """A 2-class linear model on 3x4x4 images in 0.5 +- 0.2 (on the 8-bit grid), each image
    labelled with the class it is NOT predicted as. Returns model, images, labels and the
    analytic distance of each image to the decision hyperplane (the minimal L2 float fix)."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * 4 * 4
    W = torch.randn(2, n, generator=g)
    x = grid(0.5 + 0.2 * (2 * torch.rand(4 * n_images, 3, 4, 4, generator=g) - 1))
    w = W[1] - W[0]
    s = x.flatten(1) @ w
    b = torch.tensor([0.0, -float(s.median()) - 1e-3])
    model = LinearNet(W, b)
    pred = model(x).argmax(1)
    labels = 1 - pred
    dist = (x.flatten(1) @ w + (b[1] - b[0])).abs() / w.norm()
    keep = (dist > min_dist).nonzero().squeeze(1)[:n_images]
    assert len(keep) == n_images
    x, labels, dist = x[keep], labels[keep], dist[keep]
    # The analytic fix stays well inside [0, 1], so the box never binds.
    fix = x.flatten(1) + 1.1 * dist[:, None] * torch.where(labels[:, None] == 1, w, -w) / w.norm()
    assert fix.min() > 0.05 and fix.max() < 0.95
    return model, x, labels, dist, w.norm()


# A scripted linear model on 1x4x4: class 1's logit is (255/16) * sum(x) - 128.5, class 0's is 0.
# On a constant image of value p/255 the margin toward class 1 is p - 128.5, and one signed
# step of 1/255 on all 16 pixels raises it by exactly 1. The paper attack therefore needs
# exactly k steps on the image with p = 129 - k (margin 0.5 - k).
SCRIPT_BIAS = -128.5


def scripted_model() -> LinearNet:
    W = torch.zeros(2, 16)
    W[1] = 255 / 16
    return LinearNet(W, torch.tensor([0.0, SCRIPT_BIAS]))


def scripted_images(ks) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor([129 - k for k in ks], dtype=torch.float32)
    x = (p[:, None, None, None] / 255).expand(-1, 1, 4, 4).clone()
    return x, torch.ones(len(ks), dtype=torch.long)


def cnn_problem(seed: int = 0, n: int = 8):
    torch.manual_seed(seed)
    model = TinyCNN().eval()
    x = grid(torch.rand(n, 3, 8, 8))
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = (pred + 1 + torch.randint(0, 3, (n,))) % 4
    assert (labels != pred).all()
    return model, x, labels


ATTACKS = {
    "paper": lambda **kw: PaperAttack(**kw),
    "fast": lambda **kw: FastAttack(**kw),
    "minimal": lambda **kw: MinimalAttack(**kw),
}


# --------------------------------------------------------------------------- projection


def test_projection_float_equals_boxfree_analytic_projection():
    torch.manual_seed(0)
    B, n = 8, 50
    g = torch.randn(B, n)
    # need chosen so that the exact step is a few units: c*|g_i|/||g||^2 well inside the box
    c = torch.rand(B) * 5 + 1
    c = c * g.norm(dim=1)  # ||step|| = c/||g|| in 1 ... 6 units
    pixels = torch.full((B, n), 127.0)
    out = project_to_halfspace(g, c, pixels, discrete=False)
    expected = c[:, None] * g / (g * g).sum(1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert ((g * out).sum(1) >= c * (1 - 1e-5)).all()


def test_projection_float_small_need_is_exact():
    torch.manual_seed(1)
    g = torch.randn(4, 50)
    c = 0.05 * g.norm(dim=1)  # exact step has norm 0.05 units of 1/255
    out = project_to_halfspace(g, c, torch.full((4, 50), 127.0), discrete=False)
    expected = c[:, None] * g / (g * g).sum(1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-6)


def _brute_force_min_norm(g: torch.Tensor, c: float, R: int) -> float:
    n = len(g)
    ks = torch.tensor(list(itertools.product(range(-R, R + 1), repeat=n)), dtype=torch.float32)
    feasible = ks @ g >= c
    assert feasible.any()
    return float(ks[feasible].norm(dim=1).min())


@pytest.mark.parametrize("n", [4, 5, 6])
def test_projection_discrete_within_one_step_of_brute_force(n):
    torch.manual_seed(10 + n)
    B, R = 6, 4 if n < 6 else 3
    g = torch.randn(B, n)
    c = (0.5 + 1.5 * torch.rand(B)) * g.abs().max(1).values  # optimum needs a few unit steps
    pixels = torch.full((B, n), 127.0)
    out = project_to_halfspace(g, c, pixels, discrete=True)
    assert torch.equal(out, torch.round(out))  # integers
    assert ((g * out).sum(1) >= c - 1e-5).all()
    for i in range(B):
        norm = float(out[i].norm())
        assert out[i].abs().max() <= R  # the optimum lies inside the enumerated range
        best = _brute_force_min_norm(g[i], float(c[i]), R)
        assert best - 1e-5 <= norm <= best + 1 + 1e-5, (g[i], c[i], out[i], best)


def test_projection_discrete_with_tied_gradient_is_near_optimal():
    g = torch.ones(1, 16)
    out = project_to_halfspace(g, torch.tensor([1.0]), torch.full((1, 16), 127.0), discrete=True)
    assert (g * out).sum() >= 1
    assert out.norm() <= 1 + 1 + 1e-6  # optimum is 1 (one unit step), allowed one step more


def test_projection_no_need_gives_zero():
    torch.manual_seed(2)
    g = torch.randn(3, 20)
    pixels = torch.full((3, 20), 127.0)
    for discrete in (True, False):
        out = project_to_halfspace(g, torch.tensor([0.0, -1.0, -100.0]), pixels, discrete=discrete)
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("discrete", [True, False])
def test_projection_respects_box(discrete):
    torch.manual_seed(3)
    n = 40
    g = torch.randn(2, n)
    # Pixels at the edges: those whose gradient points out of the box cannot move.
    pixels = torch.where(g > 0, torch.tensor(255.0), torch.tensor(0.0))
    pixels[:, :10] = 127.0  # some room left on the first 10
    c = torch.tensor([1.0, 1e6])  # the second cannot be reached: largest change is returned
    out = project_to_halfspace(g, c, pixels, discrete=discrete)
    after = pixels + out
    assert (after >= -1e-4).all() and (after <= 255 + 1e-4).all()
    assert (out[:, 10:] == 0).all()
    assert (g[0] * out[0]).sum() >= 1 - 1e-5
    # unreachable: every free coordinate goes to its bound in the gradient's direction
    bound = torch.where(g[1, :10] > 0, torch.tensor(128.0), torch.tensor(-127.0))
    torch.testing.assert_close(out[1, :10], bound, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- linear known answer


def test_minimal_float_reaches_hyperplane_distance():
    model, x, labels, dist, wnorm = linear_problem()
    target = WhiteBoxTarget(model, 2)
    r = MinimalAttack(pixels="float").run(target, target, x, labels)
    assert r.success.all()
    d = l2(r.corrected, x)
    floor = dist + MIN_MARGIN / wnorm  # least change that clears MIN_MARGIN
    assert (d >= dist * (1 - 1e-4)).all()  # cannot beat the analytic bound
    assert (d <= 1.05 * floor + 1e-6).all(), (d / dist)
    assert (r.corrected >= 0).all() and (r.corrected <= 1).all()
    assert (margin(model(r.corrected), labels) > 0).all()


def test_minimal_float_gets_within_one_percent():
    model, x, labels, dist, wnorm = linear_problem()
    r = MinimalAttack(pixels="float").run(*_wb(model, 2), x, labels)
    assert r.success.all()
    assert (l2(r.corrected, x) <= 1.01 * (dist + MIN_MARGIN / wnorm)).all()


def test_minimal_float_near_boundary_image():
    # One image with missing margin 1e-3 logits: well above MIN_MARGIN, below MIN_MARGIN / 0.05.
    model, x, labels, dist, wnorm = linear_problem(n_images=1)
    w = model.W[1] - model.W[0]
    sign = 1.0 if int(labels[0]) == 1 else -1.0
    m0 = sign * (x.flatten(1) @ w + model.b[1] - model.b[0])  # < 0
    model.b[1] -= sign * (float(m0) + 1e-3)  # move the boundary so the margin is -1e-3
    d = 1e-3 / float(wnorm)
    r = MinimalAttack(pixels="float").run(*_wb(model, 2), x, labels)
    assert r.success.all()
    # The search aims at margin 2 * MIN_MARGIN, so that rounding noise cannot undo it.
    assert float(l2(r.corrected, x)[0]) <= 1.05 * (d + 2 * MIN_MARGIN / float(wnorm)) + 1e-6


def test_minimal_uint8_on_grid_and_bounded_by_hyperplane_distance():
    model, x, labels, dist, wnorm = linear_problem()
    target = WhiteBoxTarget(model, 2)
    r = MinimalAttack().run(target, target, x, labels)
    assert r.success.all()
    assert on_grid(r.corrected)
    assert (r.corrected >= 0).all() and (r.corrected <= 1).all()
    assert torch.equal(model(r.corrected).argmax(1), labels)
    d = l2(r.corrected, x)
    assert (d >= dist * (1 - 1e-4)).all()
    assert (d < 3 * dist + 2 / 255).all(), (d / dist)


@pytest.mark.parametrize("grid_mode", ["steps", "both"])
def test_minimal_unit_step_grid_is_verified_and_near_the_hyperplane(grid_mode):
    """grid="steps": the 8-bit change built from unit steps in order of margin per unit of
    squared norm, with a bisection on their count; on a linear model it lands as close to
    the hyperplane as scale-then-round does, within the same queries."""
    model, x, labels, dist, _ = linear_problem()
    target = WhiteBoxTarget(model, 2)
    r = MinimalAttack(grid=grid_mode).run(target, target, x, labels)
    scaled = MinimalAttack().run(target, target, x, labels)
    assert r.success.all() and on_grid(r.corrected)
    assert torch.equal(model(r.corrected).argmax(1), labels)
    d = l2(r.corrected, x)
    assert (d >= dist * (1 - 1e-4)).all() and (d < 1.3 * dist + 2 / 255).all(), (d / dist)
    assert float(d.median()) <= 1.02 * float(l2(scaled.corrected, x).median())
    assert (r.queries <= scaled.queries.max()).all()


def test_minimal_grid_descent_keeps_verified_8bit_changes_no_larger():
    """descent_steps: DDN's quantized steps from the 8-bit correction. Every kept point is a
    verified 8-bit correction (never below the hyperplane's distance), the phase spends
    exactly its steps (one query each), and on a linear model the change is no larger than
    scale-then-round's."""
    model, x, labels, dist, _ = linear_problem()
    target = WhiteBoxTarget(model, 2)
    plain = MinimalAttack(prune_steps=0, descent_steps=0).run(target, target, x, labels)
    r = MinimalAttack(prune_steps=0, descent_steps=6).run(target, target, x, labels)
    assert r.success.all() and on_grid(r.corrected)
    assert torch.equal(model(r.corrected).argmax(1), labels)
    d, d_plain = l2(r.corrected, x), l2(plain.corrected, x)
    assert (d >= dist * (1 - 1e-4)).all()
    assert (d <= d_plain + 1e-6).all() and (d < d_plain - 1e-6).any()
    assert torch.equal(r.queries, plain.queries + 6)
    assert (r.queries <= MinimalAttack().budget_for(guide_free=False)).all()


def test_fast_on_linear_model_corrects_in_one_query():
    # The linearization is exact and the step overshoots 3x: one query per image.
    model, x, labels, dist, _ = linear_problem()
    for pixels in ("uint8", "float"):
        target = WhiteBoxTarget(model, 2)
        r = FastAttack(pixels=pixels).run(target, target, x, labels)
        assert r.success.all()
        assert (r.queries == 1).all()
        assert target.queries == len(x)
        assert (l2(r.corrected, x) >= dist * (1 - 1e-4)).all()


# --------------------------------------------------------------------------- query accounting


def test_scripted_model_is_what_the_test_assumes():
    model = scripted_model()
    x, y = scripted_images([1, 2, 3])
    m = margin(model(x), y)
    torch.testing.assert_close(m, torch.tensor([-0.5, -1.5, -2.5]), rtol=0, atol=1e-4)
    m1 = margin(model(x + STEP), y)
    torch.testing.assert_close(m1 - m, torch.ones(3), rtol=0, atol=1e-4)


def test_paper_queries_exact_with_per_image_early_stop():
    ks = [1, 4, 2, 7, 3, 1, 5]
    x, y = scripted_images(ks)
    target = WhiteBoxTarget(scripted_model(), 2)
    r = PaperAttack().run(target, target, x, y)
    assert r.success.all()
    assert r.queries.tolist() == ks
    assert r.queries.dtype == torch.long
    # The gradient on the unmodified image is not counted; every step is.
    assert target.queries == sum(ks) == int(r.queries.sum())
    # Known answer: each image moved up by exactly k levels on every pixel.
    expected = x + torch.tensor(ks, dtype=torch.float32)[:, None, None, None] / 255
    torch.testing.assert_close(r.corrected, expected, rtol=0, atol=1e-6)
    assert on_grid(r.corrected)
    torch.testing.assert_close(r.logits, model_logits(r.corrected), rtol=0, atol=1e-4)


def model_logits(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return scripted_model()(x)


def test_paper_max_steps_one_on_three_step_image():
    x, y = scripted_images([3])
    target = WhiteBoxTarget(scripted_model(), 2)
    r = PaperAttack(max_steps=1).run(target, target, x, y)
    assert r.success.tolist() == [False]
    assert r.queries.tolist() == [1]
    assert target.queries == 1


def test_paper_budget_stops_only_the_slow_images():
    ks = [1, 3, 2, 5]
    x, y = scripted_images(ks)
    target = WhiteBoxTarget(scripted_model(), 2)
    r = PaperAttack(max_steps=2).run(target, target, x, y)
    assert r.success.tolist() == [True, False, True, False]
    assert r.queries.tolist() == [1, 2, 2, 2]
    assert target.queries == 7


@pytest.mark.parametrize("name", ["fast", "minimal"])
def test_query_total_matches_target_counter(name):
    for model, x, y in [(scripted_model(), *scripted_images([1, 4, 2, 7])), cnn_problem(seed=5)]:
        k = model(x).shape[1]
        target = WhiteBoxTarget(model, k)
        r = ATTACKS[name]().run(target, target, x, y)
        assert target.queries == int(r.queries.sum())
        assert (r.queries >= 1).all()
        assert r.queries.dtype == torch.long


def test_minimal_query_count_is_known_on_linear_model():
    # Without early stopping, every image succeeds by phase 2, so each spends exactly steps +
    # grid_steps queries, descent_steps in phase 2b, plus one gradient and prune_steps checks
    # in phase 3.
    model, x, labels, _, _ = linear_problem()
    target = WhiteBoxTarget(model, 2)
    attack = MinimalAttack(patience=MinimalAttack().steps + 1)
    r = attack.run(target, target, x, labels)
    assert r.success.all()
    expected = attack.steps + attack.grid_steps + attack.descent_steps + 1 + attack.prune_steps
    assert (r.queries == expected).all()
    assert target.queries == len(x) * expected
    # With early stopping (the default), images leave phase 1 once their best norm stalls.
    target = WhiteBoxTarget(model, 2)
    early = MinimalAttack().run(target, target, x, labels)
    assert early.success.all() and (early.queries < expected).all()
    assert target.queries == int(early.queries.sum())
    target = WhiteBoxTarget(model, 2)
    attack = MinimalAttack(pixels="float", patience=MinimalAttack().steps + 1)
    r = attack.run(target, target, x, labels)
    assert (r.queries == attack.steps).all() and target.queries == len(x) * attack.steps


# --------------------------------------------------------------------------- success is verified


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("pixels", ["uint8", "float"])
def test_success_is_verified_alone(name, pixels):
    model, x, labels = cnn_problem(seed=1, n=8)
    target = WhiteBoxTarget(model, 4)
    r = ATTACKS[name](pixels=pixels).run(target, target, x, labels)
    assert r.corrected.shape == x.shape
    assert r.success.dtype == torch.bool and r.success.shape == (8,)
    assert r.success.any()  # the check below must see something
    assert (r.corrected >= 0).all() and (r.corrected <= 1).all()
    if pixels == "uint8":
        assert on_grid(r.corrected)
    before = target.queries
    for i in r.success.nonzero().squeeze(1).tolist():
        out = target.predict(r.corrected[i:i + 1], counted=False)
        assert int(out.argmax(1)) == int(labels[i])
        assert float(margin(out, labels[i:i + 1])) > 0
        # the reported logits are the target's answer on exactly that image
        torch.testing.assert_close(r.logits[i], out[0], rtol=0, atol=1e-4)
    assert target.queries == before  # counted=False really is not counted
    assert not torch.isnan(r.logits[r.queries > 0]).any()


# --------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("pixels", ["uint8", "float"])
def test_batch_invariance_and_determinism(name, pixels):
    model, x, labels = cnn_problem(seed=2, n=6)
    attack = ATTACKS[name](pixels=pixels)
    r = attack.run(*_wb(model, 4), x, labels)
    r2 = attack.run(*_wb(model, 4), x.clone(), labels.clone())
    assert torch.equal(r.corrected, r2.corrected)
    assert torch.equal(r.success, r2.success) and torch.equal(r.queries, r2.queries)
    for i in range(len(x)):
        t = WhiteBoxTarget(model, 4)
        s = attack.run(t, t, x[i:i + 1], labels[i:i + 1])
        assert bool(s.success[0]) == bool(r.success[i]), i
        assert int(s.queries[0]) == int(r.queries[i]), i
        assert t.queries == int(s.queries[0])
        torch.testing.assert_close(s.corrected[0], r.corrected[i], rtol=0, atol=1e-5)


def test_inputs_are_not_modified():
    model, x, labels = cnn_problem(seed=3, n=4)
    x0, y0 = x.clone(), labels.clone()
    for name in ATTACKS:
        ATTACKS[name]().run(*_wb(model, 4), x, labels)
    assert torch.equal(x, x0) and torch.equal(labels, y0)
