"""Recurring causes: consistency of the change maps within a confusion pair, known answers."""

import numpy as np
import pytest

from flipback.explain.recurring import mean_pairwise_cosine, recurring_causes
from flipback.store import ImageRecord


def test_mean_pairwise_cosine_matches_the_direct_sum():
    rng = np.random.default_rng(0)
    maps = rng.random((7, 20))
    unit = maps / np.linalg.norm(maps, axis=1, keepdims=True)
    sims = unit @ unit.T
    direct = (sims.sum() - np.trace(sims)) / (7 * 6)
    assert mean_pairwise_cosine(maps) == pytest.approx(direct)
    assert np.isnan(mean_pairwise_cosine(maps[:1]))


def _pair(spot):
    original = np.full((16, 16, 1), 100, np.uint8)
    corrected = original.copy()
    y, x = spot
    corrected[y:y + 2, x:x + 2] += 40
    return original, corrected


def _rec(index, true, pred, success):
    return ImageRecord(index=index, name=f"{index}.png", true=true, pred_before=pred, pred_after=true if success else pred,
                       true_name=str(true), pred_before_name=str(pred), pred_after_name=None, success=success, queries=1)


def test_a_shared_spot_is_consistent_and_scattered_spots_are_not():
    # Pair (0 -> 1): every error changed the same 2x2 spot. Pair (2 -> 3): spots far apart.
    images = {i: _pair((3, 3)) for i in range(4)}
    images.update({10 + i: _pair(s) for i, s in enumerate([(0, 0), (0, 13), (13, 0), (13, 13)])})
    records = [_rec(i, 0, 1, True) for i in range(4)]
    records += [_rec(10 + i, 2, 3, True) for i in range(4)]
    records.append(_rec(99, 2, 3, False))  # failures do not count
    out = recurring_causes(records, images.get, ["a", "b", "c", "d"])
    by_pair = {(p["true"], p["pred"]): p for p in out["pairs"]}
    assert by_pair[(0, 1)]["consistency"] == pytest.approx(1.0)
    assert by_pair[(2, 3)]["consistency"] < 0.05
    assert by_pair[(0, 1)]["consistency"] > out["reference"] > by_pair[(2, 3)]["consistency"]
    y0, x0, y1, x1 = by_pair[(0, 1)]["region"]
    assert y0 <= 3 and x0 <= 3 and y1 >= 5 and x1 >= 5 and (y1 - y0) * (x1 - x0) <= 36
    assert by_pair[(0, 1)]["n"] == 4 and by_pair[(2, 3)]["n"] == 4


def test_pairs_with_too_few_errors_are_left_out():
    images = {i: _pair((3, 3)) for i in range(2)}
    records = [_rec(i, 0, 1, True) for i in range(2)]
    assert recurring_causes(records, images.get, ["a", "b"])["pairs"] == []
