"""The `regions` method on tiny linear models whose needed regions are known exactly."""

import numpy as np
import pytest
import torch

from flipback.attacks import RegionsAttack
from flipback.attacks.regions import (effect_map, explanation_order, pixel_mask, rank_map, region_count,
                                      region_scores, region_sums)
from flipback.attacks.segments import MAX_SEGMENTS, default_segments, grid_segments, segment
from flipback.explain import explain_changes
from flipback.targets.blackbox import from_module
from flipback.targets import ModelGuide
from flipback.targets.whitebox import WhiteBoxTarget


def _wb(model, k):
    """A white-box target is both oracle and guide."""
    t = WhiteBoxTarget(model, k)
    return t, t

H = W = 16  # a 4x4 grid of 4x4 cells


class Patches(torch.nn.Module):
    """Two classes. logit1 - logit0 = sum over each patch (a 4x4 grid cell) of weight * pixels,
    minus a bias: the decision depends on those cells only."""

    def __init__(self, cells: dict[tuple[int, int], float], bias: float):
        super().__init__()
        w = torch.zeros(1, H, W)
        for (r, c), weight in cells.items():
            w[0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = weight
        self.register_buffer("w", w)
        self.bias = bias

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1) - self.bias
        return torch.stack([torch.zeros_like(s), s], 1)


def grey(n=3):
    return torch.full((n, 1, H, W), 128 / 255), torch.ones(n, dtype=torch.long)


def attack(**kw):
    """Free changes within eps, regions grown along the gradient (the defaults are "remove"
    and measured scoring; grey images have nothing to remove)."""
    opts = {"change": "free", "scoring": "gradient", "pixel_steps": 0, **kw}
    return RegionsAttack(segmentation="grid", n_segments=16, **opts)


@pytest.mark.parametrize("scoring", ["gradient", "removal"])
def test_one_cause_one_region(scoring):
    # Only cell (1, 2) matters; a change of 0.5 on its 16 pixels raises the margin by 8.
    x, y = grey()
    model = Patches({(1, 2): 1.0}, bias=16 * 128 / 255 + 4)  # margin -4 at the start
    target = WhiteBoxTarget(model, 2)
    r = attack(scoring=scoring).run(target, target, x, y)
    assert r.success.all()
    cell = torch.zeros(H, W, dtype=torch.bool)
    cell[4:8, 8:12] = True
    for ranks in r.regions:
        assert torch.equal(ranks > 0, cell)  # exactly that cell, and nothing else
    # Verified on the 8-bit grid by the model itself.
    assert torch.equal(r.corrected, torch.round(r.corrected * 255) / 255)
    assert (target.predict(r.corrected, counted=False).argmax(1) == 1).all()
    assert target.queries == int(r.queries.sum())


def test_removal_finds_the_planted_patch_and_the_fewest_pixels():
    # A bright 4x4 patch on a dark image is the whole cause: the model's class-1 margin is
    # 8 - (sum of the patch cell), so blurring the patch away corrects it. Only regions that
    # overlap the cell can help, and about half its pixels are enough.
    x = torch.zeros(2, 1, H, W)
    x[:, :, 4:8, 8:12] = 1.0
    y = torch.ones(2, dtype=torch.long)
    model = Patches({(1, 2): -1.0}, bias=-8.0)
    target = WhiteBoxTarget(model, 2)
    r = RegionsAttack(segmentation="grid", n_segments=16).run(target, target, x, y)
    assert r.success.all()
    assert (r.regions[:, 4:8, 8:12] == 1).all() and int(r.regions.max()) == 1
    changed = (r.corrected - x).abs().sum(1) > 0
    assert not changed[:, :, :8].any() and not changed[:, :4].any()  # nothing outside the patch's cell
    assert 9 <= int(changed[0].sum()) < 16  # fewest pixels: more than 8 whole pixels must go
    # The explanation ranks the removed pixels first, then the rest of the patch's cell.
    top = r.order.flatten(1).argsort(dim=1, descending=True)[:, :16]
    cell = torch.zeros(H * W, dtype=torch.bool)
    cell.view(H, W)[4:8, 8:12] = True
    assert cell[top].all()
    assert target.queries == int(r.queries.sum())
    assert (target.predict(r.corrected, counted=False).argmax(1) == 1).all()


def test_two_causes_are_both_needed_and_ranked_by_contribution():
    # Each cell alone can add at most 16 * 0.5 * weight; the deficit needs both.
    x, y = grey()
    model = Patches({(0, 0): 1.0, (3, 3): 2.0, (2, 1): 0.01}, bias=(16 * 3.01) * 128 / 255 + 18)
    r = attack(shrink_steps=0).run(*_wb(model, 2), x, y)
    assert r.success.all()
    for ranks in r.regions:
        assert set(ranks.unique().tolist()) == {0, 1, 2}
        assert (ranks[12:, 12:] == 1).all()  # the heavier cell first
        assert (ranks[:4, :4] == 2).all()
        assert (ranks[8:12, 4:8] == 0).all()  # the nearly irrelevant cell is not needed


def test_pruning_takes_back_a_region_that_is_not_needed():
    # The first step on two cells overshoots; the weaker one is not needed and is dropped.
    x, y = grey(1)
    model = Patches({(0, 0): 1.0, (3, 3): 1.2}, bias=(16 * 2.2) * 128 / 255 + 5)
    r = attack(steps_per_region=1).run(*_wb(model, 2), x, y)
    assert r.success.all()
    assert int(r.regions.max()) == 1 and (r.regions[0, 12:, 12:] == 1).all()


def test_budget_is_never_exceeded_and_failures_are_reported():
    x, y = grey(2)
    model = Patches({(0, 0): 1.0}, bias=1e6)  # impossible
    target = WhiteBoxTarget(model, 2)
    r = attack(max_queries=9).run(target, target, x, y)
    assert not r.success.any()
    assert (r.queries <= 9).all() and target.queries == int(r.queries.sum())


@pytest.mark.parametrize("output", ["scores", "label"])
def test_black_box_asks_the_target_only_when_the_surrogate_is_confident(output):
    x, y = grey()
    model = Patches({(1, 2): 1.0}, bias=16 * 128 / 255 + 4)
    target = from_module(model, 2, output=output)
    r = RegionsAttack(segmentation="grid", n_segments=16, shrink_steps=0, change="free",
                      scoring="gradient", pixel_steps=0).run(target, ModelGuide(model, 2), x, y, torch.arange(3))
    assert r.success.all()
    assert r.queries.tolist() == [1, 1, 1]  # an exact surrogate: the first candidate is right
    assert target.queries == 3
    assert (r.regions[:, 4:8, 8:12] == 1).all() and int(r.regions.max()) == 1


def test_rank_map():
    seg = grid_segments(1, 4, 4, 4)  # four 2x2 cells
    selected = torch.tensor([[True, False, True, True]])
    contribution = torch.tensor([[1.0, 9.0, 3.0, 2.0]])
    ranks = rank_map(seg.flatten(1), selected, contribution, (1, 1, 4, 4))
    assert ranks[0].tolist() == [[3, 3, 0, 0], [3, 3, 0, 0], [1, 1, 2, 2], [1, 1, 2, 2]]


def test_segment_indexed_operations_have_the_known_answers_and_equal_the_dense_ones():
    # Two 4x4 images, one channel (and one with 2 channels for the channel sum): image 0 is
    # four 2x2 cells with values 1..16 row by row; image 1 uses only regions 0 and 3.
    seg = torch.stack([grid_segments(1, 4, 4, 4)[0],
                       torch.tensor([[0, 0, 3, 3]] * 4)]).flatten(1)
    s = region_count(seg)
    assert s == 4
    values = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4).repeat(2, 2, 1, 1)  # 2 channels
    scores = region_scores(values, seg, s)
    # Cell sums of 1..16 (times 2 channels): top-left 1+2+5+6 = 14, top-right 22, bottom 46, 54.
    assert scores[0].tolist() == [28.0, 44.0, 92.0, 108.0]
    assert scores[1].tolist() == [2 * (1 + 2 + 5 + 6 + 9 + 10 + 13 + 14), 0.0, 0.0, 2 * (3 + 4 + 7 + 8 + 11 + 12 + 15 + 16)]
    effect = torch.tensor([[1.0, float("-inf"), 3.0, 4.0], [5.0, 6.0, 7.0, float("-inf")]])
    assert effect_map(seg, effect, (4, 4))[1].tolist() == [[5.0, 5.0, 0.0, 0.0]] * 4  # -inf reads 0
    selected = torch.tensor([[False, True, False, True], [True, False, False, False]])
    mask = pixel_mask(seg, selected, (2, 1, 4, 4))
    assert mask[0, 0].tolist() == [[0, 0, 1, 1]] * 4  # regions 1 (top right) and 3 (bottom right)
    assert mask[1, 0].tolist() == [[1, 1, 0, 0]] * 4

    # The same operations written with the dense (pixels x regions) one-hot they replace.
    onehot = torch.nn.functional.one_hot(seg, s).float()  # (n, H*W, S)
    dense_scores = torch.bmm(values.sum(1).flatten(1)[:, None, :], onehot).squeeze(1)
    measured = torch.where(torch.isfinite(effect), effect, torch.zeros_like(effect))
    dense_effect = torch.bmm(onehot, measured[:, :, None]).squeeze(2).view(2, 4, 4)
    dense_mask = (torch.bmm(onehot, selected.float()[:, :, None]).squeeze(2) > 0).float().view(2, 1, 4, 4)
    assert torch.equal(scores, dense_scores)
    assert torch.equal(effect_map(seg, effect, (4, 4)), dense_effect)
    assert torch.equal(mask, dense_mask)
    # Random values on a random segmentation: equal up to the order of the float sums.
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 7, (3, 64), generator=g)
    vals = torch.randn(3, 3, 8, 8, generator=g)
    onehot = torch.nn.functional.one_hot(seg, region_count(seg)).float()
    dense = torch.bmm(vals.sum(1).flatten(1)[:, None, :], onehot).squeeze(1)
    assert torch.allclose(region_scores(vals, seg, region_count(seg)), dense, atol=1e-5)
    assert torch.equal(region_sums(torch.ones(3, 64), seg, 7), onehot.sum(1))


def test_segment_count_rule():
    assert default_segments(32, 32) == 102 and default_segments(28, 28) == 78  # unchanged small images
    assert default_segments(4, 4) == 4
    assert default_segments(224, 224) == MAX_SEGMENTS == 196 and default_segments(512, 384) == 196


def test_explanation_order_is_lexicographic():
    changed = torch.tensor([[[False, True], [True, False]]])
    gain = torch.tensor([[[0.0, 1.0], [5.0, 0.0]]])
    effect = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # both unchanged pixels in equally good regions
    potential = torch.tensor([[[0.1, 9.0], [9.0, 0.7]]])
    order = explanation_order(changed, gain, effect, potential).flatten().argsort(descending=True)
    # changed pixels by gain (5 then 1), then the rest by region effect, ties by potential
    assert order.tolist() == [2, 1, 3, 0]


def test_unchanged_pixels_of_helping_regions_rank_by_their_own_gain_not_by_region_size():
    # Pixels 0 and 1 lie in a large region whose (summed) effect is big, pixel 2 in a small
    # decisive one, pixel 3 in a region whose removal would undo the correction. Among the
    # helping regions' pixels the pixel's own first-order gain decides; the harmful one is last.
    changed = torch.zeros(1, 2, 2, dtype=torch.bool)
    gain = torch.zeros(1, 2, 2)
    effect = torch.tensor([[[6.0, 6.0], [0.5, -1.0]]])
    potential = torch.tensor([[[0.2, 0.1], [3.0, 5.0]]])
    order = explanation_order(changed, gain, effect, potential).flatten().argsort(descending=True)
    assert order.tolist() == [2, 0, 1, 3]


def test_explanation_uses_the_method_regions():
    x, y = grey(1)
    model = Patches({(1, 2): 1.0}, bias=16 * 128 / 255 + 4)
    r = attack().run(*_wb(model, 2), x, y)
    e = explain_changes(x.permute(0, 2, 3, 1).numpy(), r.corrected.permute(0, 2, 3, 1).numpy(),
                        region_ranks=r.regions.numpy(), region_gain=r.importance.numpy())[0]
    assert len(e.regions) == 1
    assert e.regions[0].bbox == (4, 8, 8, 12) and e.regions[0].area == 16
    assert e.regions[0].share == pytest.approx(1.0)


def test_slic_segments_follow_edges():
    # Two flat halves: no superpixel straddles the edge.
    img = torch.zeros(1, 3, 16, 16)
    img[:, :, :, 8:] = 1.0
    seg = segment(img, "slic", n_segments=8)[0].numpy()
    for label in np.unique(seg):
        cols = np.nonzero(seg == label)[1]
        assert cols.max() < 8 or cols.min() >= 8


@pytest.mark.parametrize("output", ["scores", "label"])
def test_black_box_removal_is_measured_on_the_surrogate_and_verified_by_the_target(output):
    x = torch.zeros(2, 1, H, W)
    x[:, :, 4:8, 8:12] = 1.0
    y = torch.ones(2, dtype=torch.long)
    model = Patches({(1, 2): -1.0}, bias=-8.0)
    target = from_module(model, 2, output=output)
    r = RegionsAttack(segmentation="grid", n_segments=16).run(target, ModelGuide(model, 2), x, y, torch.arange(2))
    assert r.success.all()
    assert (r.regions[:, 4:8, 8:12] == 1).all() and int(r.regions.max()) == 1
    # Measuring 16 regions cost nothing; the target saw only the bisections' candidates.
    assert (r.queries < 16).all()
    assert target.queries == int(r.queries.sum())
    assert (model(r.corrected).argmax(1) == 1).all()


def test_a_budget_too_small_to_measure_every_region_grows_regions_within_it():
    # 16 regions to measure do not fit in 12 queries: the method grows regions instead.
    x = torch.zeros(2, 1, H, W)
    x[:, :, 4:8, 8:12] = 1.0
    y = torch.ones(2, dtype=torch.long)
    target = WhiteBoxTarget(Patches({(1, 2): -1.0}, bias=-8.0), 2)
    r = RegionsAttack(segmentation="grid", n_segments=16, max_queries=12, pixel_steps=2).run(target, target, x, y)
    assert r.success.all()
    assert (r.queries <= 12).all() and target.queries == int(r.queries.sum())
    assert (r.regions[:, 4:8, 8:12] == 1).all()


@pytest.mark.parametrize("mode", ["white-box", "scores", "label"])
def test_images_a_removal_cannot_correct_get_a_free_change_and_say_so(mode, monkeypatch):
    # margin = 8 - (sum of cell (1, 2)). Image 0 has a bright patch there: blurring it away
    # corrects it. Image 1 is flat grey (margin -0.03): its blur is itself, so no removal can
    # change anything, but lowering the cell by eps can.
    x = torch.full((2, 1, H, W), 128 / 255)
    x[0] = 0.0
    x[0, :, 4:8, 8:12] = 1.0
    y = torch.ones(2, dtype=torch.long)
    model = Patches({(1, 2): -1.0}, bias=-8.0)
    if mode == "white-box":
        oracle = guide = WhiteBoxTarget(model, 2)
    else:
        oracle, guide = from_module(model, 2, output=mode), ModelGuide(model, 2)
    import flipback.attacks.regions as regions_module

    segmented = []  # the images segmented: the fallback reuses the first pass's regions
    real_segment = regions_module.segment
    monkeypatch.setattr(regions_module, "segment", lambda images, *a: segmented.append(len(images)) or real_segment(images, *a))
    r = RegionsAttack(segmentation="grid", n_segments=16).run(oracle, guide, x, y, torch.arange(2))
    assert r.success.all() and r.change == ["remove", "free"]
    assert segmented == [2]
    assert (r.regions[:, 4:8, 8:12] == 1).all() and int(r.regions.max()) == 1
    assert (model(r.corrected).argmax(1) == 1).all()
    assert torch.equal(r.corrected, torch.round(r.corrected * 255) / 255)
    budget = RegionsAttack().budget_for(guide_free=guide is not oracle, shape=(H, W))
    assert (r.queries <= budget).all() and oracle.queries == int(r.queries.sum())
    # The trace carries on across the fallback: its last entry is the kept correction.
    last = r.trace[1][-1]
    assert last[0] <= int(r.queries[1]) and last[1] == pytest.approx(float((r.corrected[1] - x[1]).norm()), abs=1e-5)
    # Without the fallback the grey image stays wrong, and says no change corrected it.
    oracle2 = oracle if mode == "white-box" else from_module(model, 2, output=mode)
    r = RegionsAttack(segmentation="grid", n_segments=16, fallback=None).run(
        oracle2, oracle2 if mode == "white-box" else guide, x, y, torch.arange(2))
    assert r.success.tolist() == [True, False] and r.change == ["remove", None]


def test_the_change_reaches_the_records_and_the_summary(tmp_path):
    from flipback.runs.explain_run import concat_results

    x = torch.full((2, 1, H, W), 128 / 255)
    x[0] = 0.0
    x[0, :, 4:8, 8:12] = 1.0
    y = torch.ones(2, dtype=torch.long)
    target = WhiteBoxTarget(Patches({(1, 2): -1.0}, bias=-8.0), 2)
    parts = [RegionsAttack(segmentation="grid", n_segments=16).run(target, target, x[i:i + 1], y[i:i + 1])
             for i in range(2)]
    assert concat_results(parts).change == ["remove", "free"]


def test_per_image_fallback_keeps_the_region_maps():
    """When a batch fails and is redone image by image, the regions survive; a failed image
    gets empty maps."""
    from flipback.runs.engine import Engine
    from flipback.runs.explain_run import _attack_batch

    x = torch.zeros(3, 1, H, W)
    x[:, :, 4:8, 8:12] = 1.0
    y = torch.ones(3, dtype=torch.long)
    model = Patches({(1, 2): -1.0}, bias=-8.0)

    class Fragile(RegionsAttack):
        def run(self, oracle, guide, images, labels, ids=None, **kw):
            if len(images) > 1 or int(ids[0]) == 1:
                raise RuntimeError("broken image")
            return super().run(oracle, guide, images, labels, ids, **kw)

    target = WhiteBoxTarget(model, 2)
    engine = Engine(target, target, Fragile(segmentation="grid", n_segments=16))
    result, errors, _ = _attack_batch(engine, x, y, np.arange(3))
    assert result.success.tolist() == [True, False, True]
    assert errors[1].startswith("RuntimeError") and errors[0] is None
    assert result.regions.shape == (3, H, W) and result.order.shape == (3, H, W)
    assert (result.regions[[0, 2], 4:8, 8:12] == 1).all() and (result.regions[1] == 0).all()


class Interaction(torch.nn.Module):
    """Two classes; logit1 - logit0 = -1 + 2a + b - 2ab + 0.2c, where a, b and c are the shares
    of cells A (0, 0), B (3, 3) and C (1, 2) blurred away (0 at `x0`, 1 at `blur`). B helps
    alone, but hurts once more than half of A is gone."""

    def __init__(self, x0, blur):
        super().__init__()
        self.register_buffer("x0", x0[:1])
        self.register_buffer("away", x0[:1] - blur[:1])

    def share(self, x, r, c):
        cell = (slice(None), slice(None), slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))
        return (self.x0 - x)[cell].flatten(1).sum(1) / self.away[cell].flatten(1).sum(1)

    def forward(self, x):
        a, b, c = self.share(x, 0, 0), self.share(x, 3, 3), self.share(x, 1, 2)
        s = -1 + 2 * a + b - 2 * a * b + 0.2 * c
        return torch.stack([torch.zeros_like(s), s], 1)


@pytest.mark.parametrize("max_queries", [250, 40])
def test_after_the_change_regions_rank_by_their_effect_on_top_of_it(max_queries):
    from flipback.attacks.regions import local_blur

    x = torch.zeros(2, 1, H, W)
    for r, c in ((0, 0), (3, 3), (1, 2)):
        x[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1.0
    y = torch.ones(2, dtype=torch.long)
    target = WhiteBoxTarget(Interaction(x, local_blur(x, 4.0)), 2)
    r = RegionsAttack(segmentation="grid", n_segments=16, max_queries=max_queries).run(target, target, x, y)
    assert r.success.all()
    assert (r.queries <= max_queries).all() and target.queries == int(r.queries.sum())
    changed = (r.corrected - x).abs().sum(1) > 0
    assert not changed[:, 4:].any() and not changed[:, :, 4:].any()  # only A: more than half of it (2a > 1)
    assert (changed.flatten(1).sum(1) < 16).all()
    ranks = r.order.flatten(1).argsort(dim=1, descending=True).argsort(dim=1).view(2, H, W)  # 0 = first
    a_rest, b_cell, c_cell = ranks[:, :4, :4][~changed[:, :4, :4]].view(2, -1), ranks[:, 12:, 12:], ranks[:, 4:8, 8:12]
    n = changed.flatten(1).sum(1)
    # The changed pixels first, then the rest of A (on top of the change, it still adds 2(1 - a)).
    assert (ranks.flatten(1)[changed.flatten(1)].view(2, -1) < n[:, None]).all()
    assert (a_rest < 16).all()
    if max_queries == 250:
        # Measured on top of the change, B would undo it (1 - 2a < 0): C goes before it and B last.
        assert (c_cell.flatten(1).max(1).values < b_cell.flatten(1).min(1).values).all()
        assert (b_cell >= H * W - 16).all()
    else:
        # Too few queries left to measure again: the effects on the original image (B 1 > C 0.2).
        assert (b_cell.flatten(1).max(1).values < c_cell.flatten(1).min(1).values).all()


def test_default_budget_and_region_cap_follow_the_region_count():
    """32 and 28 px keep issue 4's defaults (250 queries, 16 regions); images with more regions
    keep the same queries after measuring each region once, and the same share of regions
    (224 px: 196 regions, 344 queries, 30 regions). Explicit settings win; a free guide keeps 40."""
    a = RegionsAttack()
    assert a.budget_for(guide_free=False, shape=(32, 32)) == 250 == a.budget_for(guide_free=False, shape=(28, 28))
    assert a.budget_for(guide_free=False) == 250
    assert a.budget_for(guide_free=False, shape=(224, 224)) == 196 + 148 == 344
    assert a.budget_for(guide_free=True, shape=(224, 224)) == 40
    assert RegionsAttack(max_queries=99).budget_for(guide_free=False, shape=(224, 224)) == 99
    assert RegionsAttack(n_segments=300).budget_for(guide_free=False, shape=(32, 32)) == 448
    assert [a._max_regions(s) for s in (4, 78, 102, 196)] == [16, 16, 16, 30]
    assert RegionsAttack(max_regions=5)._max_regions(196) == 5


def test_the_call_budget_comes_from_the_image_size():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 70 * 70, 3))
    target = WhiteBoxTarget(net, 3)
    call = RegionsAttack().start(target, target, torch.rand(2, 3, 70, 70), torch.tensor([0, 1]), None, None)
    assert call.budget.tolist() == [default_segments(70, 70) + 148] * 2


class Hill(torch.nn.Module):
    """Two classes; logit1 - logit0 = -1 - 4 (a - 0.7)^2 + 6 (d - 0.5), where a and d are the
    means of cells A (1, 2) and D (3, 0). In A the margin peaks at a = 0.7, still at -1: a
    removal there steps past the peak and back, and never corrects. D is mid-grey on black:
    its removal (toward the darker blur) hurts, but a free change that brightens it corrects."""

    def forward(self, x):
        a = x[:, 0, 4:8, 8:12].mean((1, 2))
        d = x[:, 0, 12:16, 0:4].mean((1, 2))
        s = -1 - 4 * (a - 0.7) ** 2 + 6 * (d - 0.5)
        return torch.stack([torch.zeros_like(s), s], 1)


def test_an_image_stuck_at_the_region_cap_leaves_its_budget_to_the_fallback():
    x = torch.zeros(1, 1, H, W)
    x[0, 0, 4:8, 8:12] = 1.0
    x[0, 0, 12:16, 0:4] = 0.5
    y = torch.ones(1, dtype=torch.long)
    target = WhiteBoxTarget(Hill(), 2)
    # Removal only, one region allowed: it takes A, whose steps swing back and forth. It is
    # given up after a few steps at the cap instead of spending the budget (250) on them.
    r = RegionsAttack(segmentation="grid", n_segments=16, max_regions=1, fallback=None).run(target, target, x, y)
    assert not r.success.any() and int(r.queries[0]) < 40
    # So the free change has the budget to find D.
    target = WhiteBoxTarget(Hill(), 2)
    r = RegionsAttack(segmentation="grid", n_segments=16, max_regions=1).run(target, target, x, y)
    assert r.success.all() and r.change == ["free"]
    assert (r.regions[0, 12:16, 0:4] == 1).all() and int(r.regions.max()) == 1
    assert target.queries == int(r.queries.sum()) <= 250
