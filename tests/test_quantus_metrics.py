"""Quantus's metrics on saved maps (issue 14): known answers on masks and an analytic model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import quantus  # noqa: F401  (the test extra installs it: a missing package fails the suite)

from flipback.explain.quantus_metrics import localisation, mean_ranks, road, road_auc


def _masks(n: int = 8, size: int = 12, side: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    corners = rng.integers(1, size - side - 1, (n, 2))
    for k, (y, x) in enumerate(corners):
        masks[k, y:y + side, x:x + side] = True
    return masks


def test_an_oracle_map_scores_one_on_every_localisation_metric():
    masks = _masks()
    scores = localisation(masks.astype(np.float32), masks)
    for name, s in scores.items():
        assert s.shape == (len(masks),) and np.allclose(s, 1.0), name


def test_a_map_that_points_beside_the_cause_scores_zero():
    masks = _masks()
    beside = np.roll(masks, 5, axis=2).astype(np.float32)  # the same square, moved off the mask
    assert not (beside.astype(bool) & masks).any()
    scores = localisation(beside, masks)
    assert np.allclose(scores["pointing_game"], 0) and np.allclose(scores["relevance_rank_accuracy"], 0)
    assert np.allclose(scores["relevance_mass_accuracy"], 0)


class BrightPatch(torch.nn.Module):
    """Class 0 while any pixel is above 0.9, class 1 otherwise: a bright patch is the cause."""

    def forward(self, x):
        s = 40 * (x.flatten(1).amax(1) - 0.9)
        return torch.stack([s, -s], 1)


def test_road_corrects_once_the_cause_is_imputed_and_never_with_the_wrong_map():
    masks = _masks(side=3)  # 9 of 144 pixels: 6.25% of the image
    images = np.full((len(masks), 1, 12, 12), 0.2, np.float32)
    images[:, 0][masks] = 1.0
    labels = np.ones(len(masks), np.int64)  # the truth is class 1: every image is an error
    model = BrightPatch()
    assert (model(torch.from_numpy(images)).argmax(1) == 0).all()
    oracle = road(model, images, labels, masks.astype(np.float32), percentages=(1, 5, 10))
    assert oracle == {1.0: 0.0, 5.0: 0.0, 10.0: 1.0}  # all 9 pixels imputed only at 10%
    wrong = road(model, images, labels, (~masks).astype(np.float32), percentages=(1, 5, 10))
    assert wrong == {1.0: 0.0, 5.0: 0.0, 10.0: 0.0}
    # Every image counts, in chunks of any size (Quantus alone averages only its first batch).
    half = masks.astype(np.float32)
    half[len(masks) // 2:] = 0  # the second half: a constant map, which Quantus alone refuses;
    # its pixels rank in row-major order, so the top-left corner is imputed, not the patch
    assert road(model, images, labels, half, percentages=(10,), batch_size=3) == {10.0: 0.5}
    assert road_auc(oracle) == pytest.approx(0.25)  # trapezoids over (0, 1, 5, 10)


def test_road_imputes_whole_pixels_of_colour_images():
    # Quantus 0.6's ROAD alone raised IndexError on RGB (its indices span C*H*W, its
    # imputation one H*W plane). The cause here is bright in the green channel only, so the
    # answer changes only if the right pixels are imputed, all three channels of each.
    masks = _masks(side=3)
    images = np.full((len(masks), 3, 12, 12), 0.2, np.float32)
    images[:, 1][masks] = 1.0
    labels = np.ones(len(masks), np.int64)
    model = BrightPatch()
    oracle = road(model, images, labels, masks.astype(np.float32), percentages=(1, 5, 10))
    assert oracle == {1.0: 0.0, 5.0: 0.0, 10.0: 1.0}  # 14 of 144 pixels at 10% cover the 9
    wrong = road(model, images, labels, (~masks).astype(np.float32), percentages=(1, 5, 10))
    assert wrong == {1.0: 0.0, 5.0: 0.0, 10.0: 0.0}


def test_mean_ranks_share_ties_and_skip_missing_metrics():
    table = {"a": {"m1": 0.9, "m2": 0.5}, "b": {"m1": 0.9, "m2": 0.7}, "c": {"m1": 0.1}}
    assert mean_ranks(table, ["m1", "m2"]) == {"a": (1.5 + 2) / 2, "b": (1.5 + 1) / 2, "c": 3.0}


@pytest.mark.parametrize("kind", ["checker", "sticker", "or", "and", "background"])
def test_an_oracle_map_of_every_planted_kind_scores_one(kind):
    # Issue 14: each new cue kind's mask, given as the map, is a perfect explanation.
    from flipback.data.planted import Cue, plant
    from flipback.explain.metrics import pointing_game, topk_precision

    rng = np.random.default_rng(0)
    images = np.zeros((6, 28, 28, 1), np.uint8)
    images[:, 8:20, 9:19] = rng.integers(60, 256, (6, 12, 10, 1), dtype=np.uint8)
    _, masks = plant(images, Cue(size=3, kind=kind), rng)
    for name, s in localisation(masks.astype(np.float32), masks).items():
        assert np.allclose(s, 1.0), (kind, name)
    m = torch.from_numpy(masks)
    assert pointing_game(m.float(), m).all() and torch.allclose(topk_precision(m.float(), m), torch.tensor(1.0))


def test_the_blend_pattern_as_map_correlates_one_and_noise_near_zero():
    from flipback.data.planted import Cue, plant
    from flipback.explain.metrics import pattern_correlation

    _, pattern = plant(np.zeros((4, 28, 28, 3), np.uint8), Cue(kind="blend"), np.random.default_rng(0))
    p = torch.from_numpy(pattern)
    assert torch.allclose(pattern_correlation(3 * p + 1, p), torch.ones(4), atol=1e-5)
    noise = torch.from_numpy(np.random.default_rng(9).random((4, 28, 28)).astype(np.float32))
    assert pattern_correlation(noise, p).abs().max() < 0.15
    assert (pattern_correlation(torch.zeros(4, 28, 28), p) == 0).all()  # a constant map says nothing


def test_both_found_needs_a_top_pixel_in_each_patch():
    from flipback.explain.metrics import parts_found

    parts = np.zeros((2, 2, 10, 10), bool)
    parts[:, 0, 1:3, 1:3] = True
    parts[:, 1, 6:8, 6:8] = True
    maps = np.zeros((2, 10, 10), np.float32)
    maps[0] = parts[0].any(0)  # both patches
    maps[1, 1:3, 1:3], maps[1, 4:6, 4:6] = 1, 1  # one patch and beside the other
    assert parts_found(torch.from_numpy(maps), torch.from_numpy(parts)).tolist() == [True, False]
