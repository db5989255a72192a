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


def test_mean_ranks_share_ties_and_skip_missing_metrics():
    table = {"a": {"m1": 0.9, "m2": 0.5}, "b": {"m1": 0.9, "m2": 0.7}, "c": {"m1": 0.1}}
    assert mean_ranks(table, ["m1", "m2"]) == {"a": (1.5 + 2) / 2, "b": (1.5 + 1) / 2, "c": 3.0}
