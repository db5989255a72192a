"""Faithfulness metrics: hand-made maps and masks, and deletion-to-correct on a scripted model."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from flipback.explain.metrics import (
    DeletionResult,
    change_map,
    curve_auc,
    deletion_counts,
    deletion_to_correct,
    neutral_images,
    pointing_game,
    rank_pixels,
    to_8bit,
    topk_precision,
)


def masks_from(*grids):
    return torch.tensor(grids, dtype=torch.bool)


def test_pointing_game_unique_maximum():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.2]], [[0.0, 1.0], [0.5, 0.2]]])
    masks = masks_from([[0, 1], [0, 0]], [[1, 0], [1, 1]])
    assert pointing_game(maps, masks).tolist() == [True, False]


def test_pointing_game_ties():
    maps = torch.tensor([[[3.0, 0.0], [3.0, 1.0]],  # two maxima, one inside
                         [[3.0, 0.0], [3.0, 1.0]],  # two maxima, both inside
                         [[2.0, 2.0], [2.0, 2.0]],  # constant map, partial mask
                         [[2.0, 2.0], [2.0, 2.0]]])  # constant map, mask = whole image
    masks = masks_from([[1, 0], [0, 0]], [[1, 0], [1, 0]], [[1, 1], [1, 0]], [[1, 1], [1, 1]])
    assert pointing_game(maps, masks).tolist() == [False, True, False, True]
    assert pointing_game(maps, masks, ties="any").tolist() == [True, True, True, True]
    with pytest.raises(ValueError, match="ties"):
        pointing_game(maps, masks, ties="first")


def test_pointing_game_nan_is_lowest_and_shapes_are_checked():
    maps = torch.tensor([[[float("nan"), 0.1], [0.0, 0.0]]])
    assert pointing_game(maps, masks_from([[0, 1], [0, 0]])).tolist() == [True]
    with pytest.raises(ValueError, match="differ in shape"):
        pointing_game(maps, torch.ones(1, 3, 3, dtype=torch.bool))


def test_rank_pixels_breaks_ties_in_row_major_order():
    maps = torch.tensor([[[1.0, 2.0, 1.0], [2.0, 0.0, 1.0]]])
    # order: (0,1)=2, (1,0)=2, (0,0)=1, (0,2)=1, (1,2)=1, (1,1)=0
    assert rank_pixels(maps).tolist() == [[2, 0, 3, 1, 5, 4]]


def test_topk_precision_by_hand():
    maps = torch.tensor([
        [[9.0, 8.0, 0.0], [7.0, 1.0, 0.0]],  # top 3: (0,0) (0,1) (1,0)
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],  # all tied: top 2 are the first two in row-major order
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        [[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # empty mask: undefined
    ])
    masks = masks_from([[1, 0, 1], [1, 0, 0]], [[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 0]],
                       [[0, 0, 0], [0, 0, 0]])
    got = topk_precision(maps, masks)
    assert got.dtype == torch.float32
    assert got[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert torch.isnan(got[3])


def test_neutral_images_is_a_deterministic_8bit_blur():
    g = torch.Generator().manual_seed(0)
    x = to_8bit(torch.rand(2, 3, 12, 12, generator=g))
    x[1] = 100 / 255  # a constant image is already neutral
    a, b = neutral_images(x), neutral_images(x)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, to_8bit(a))  # on the 8-bit grid
    torch.testing.assert_close(a[1], x[1])
    assert a[0].std() < x[0].std() / 2  # it is blurred
    spot = torch.zeros(1, 1, 9, 9)
    spot[0, 0, 4, 4] = 1.0
    faded = neutral_images(spot, sigma=1.0)
    assert 0 < faded[0, 0, 4, 4] < 0.2 and faded[0, 0, 0, 0] == 0
    assert torch.equal(neutral_images(spot, sigma=0.0), spot)


def test_change_map_is_per_pixel_l2_over_channels():
    x = torch.zeros(1, 3, 2, 2)
    y = x.clone()
    y[0, :, 0, 1] = torch.tensor([0.3, 0.4, 0.0])
    y[0, 2, 1, 0] = -0.2
    got = change_map(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([[[0.0, 0.5], [0.2, 0.0]]]))


def test_curve_auc():
    fr = (0.01, 0.02, 0.05, 0.10)
    assert float(curve_auc(fr, torch.ones(4))) == pytest.approx(0.95)  # loses only the first half-step
    assert float(curve_auc(fr, torch.zeros(4))) == 0.0
    assert float(curve_auc((0.5, 1.0), torch.tensor([1.0, 1.0]))) == pytest.approx(0.75)
    assert deletion_counts(fr, 32, 32) == [10, 20, 51, 102]
    assert deletion_counts(fr, 28, 28) == [8, 16, 39, 78]
    assert deletion_counts((0.001,), 10, 10) == [1]


# Scripted model on 1x10x10 images (100 pixel locations, so the fractions 1, 2, 5 and 10%
# delete exactly 1, 2, 5 and 10 pixels): it answers class 1 (wrong) while the region R (the
# top-left 4x4 block) holds more than 1.5 units of brightness, class 0 (true) once it does not.
R = (slice(0, 4), slice(0, 4))
FRACTIONS = (0.01, 0.02, 0.05, 0.10)


class Scripted:
    def __init__(self):
        self.calls = []

    def __call__(self, x):
        self.calls.append(len(x))
        s = x[:, 0, R[0], R[1]].sum((1, 2))
        return torch.stack([torch.zeros_like(s), s - 1.5], 1)


def scripted_images():
    # Bright pixels inside R: 2 (one deletion corrects), 4 (three needed), 12 (eleven needed).
    # Pixels outside R are bright too, so deleting there never helps.
    x = torch.zeros(3, 1, 10, 10)
    x[:, 0, 6:, 6:] = 1.0
    for i, k in enumerate((2, 4, 12)):
        x[i, 0].view(-1)[torch.tensor([r * 10 + c for r in range(4) for c in range(4)][:k])] = 1.0
    return x


def test_deletion_to_correct_exact_curve():
    x = scripted_images()
    labels = torch.zeros(3, dtype=torch.long)
    model = Scripted()
    assert model(x).argmax(1).tolist() == [1, 1, 1]
    cue_first = torch.zeros(3, 10, 10)
    cue_first[:, R[0], R[1]] = 1.0 + x[:, 0, R[0], R[1]]  # R's bright pixels first, then R's dark ones
    res = deletion_to_correct(model, x, labels, cue_first, FRACTIONS, neutral=torch.zeros_like(x))
    assert isinstance(res, DeletionResult)
    assert res.correct.tolist() == [[True, True, True, True], [False, False, True, True], [False] * 4]
    assert res.rates.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    # Trapezoid over x = 0, .01, .02, .05, .10 with y(0) = 0, divided by 0.10: 8/15.
    expected = (Fraction(1, 600) + Fraction(2, 600) + Fraction(9, 600) + Fraction(20, 600)) / Fraction(1, 10)
    assert expected == Fraction(8, 15)
    assert res.auc == pytest.approx(float(expected), abs=1e-12)
    assert res.image_auc().tolist() == pytest.approx([0.95, 0.65, 0.0])
    assert res.image_auc().mean().item() == pytest.approx(res.auc)
    assert res.to_dict()["n"] == 3
    # All fractions of all images go through predict in batches of at most batch_size.
    model.calls.clear()
    again = deletion_to_correct(model, x, labels, cue_first, FRACTIONS, neutral=torch.zeros_like(x), batch_size=8)
    assert sum(model.calls) == 12 and max(model.calls) <= 8
    assert torch.equal(again.correct, res.correct)


def test_deletion_to_correct_cue_last_never_corrects():
    x = scripted_images()
    cue_last = torch.ones(3, 10, 10)
    cue_last[:, R[0], R[1]] = 0.0
    res = deletion_to_correct(Scripted(), x, torch.zeros(3, dtype=torch.long), cue_last, FRACTIONS,
                              neutral=torch.zeros_like(x))
    assert not res.correct.any() and res.auc == 0.0


def test_deletion_to_correct_ties_and_default_neutral():
    x = scripted_images()
    labels = torch.zeros(3, dtype=torch.long)
    # A constant map deletes the first pixels in row-major order: row 0 of R holds the bright
    # pixels of images 0 and 1 (2 of 2, and 4 of 4), so they behave as with cue_first.
    flat = deletion_to_correct(Scripted(), x, labels, torch.zeros(3, 10, 10), FRACTIONS,
                               neutral=torch.zeros_like(x))
    assert flat.correct[:2].tolist() == [[True] * 4, [False, False, True, True]]
    # Default neutral: the blur, rounded to 8 bits; still deterministic.
    a = deletion_to_correct(Scripted(), x, labels, torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0)))
    b = deletion_to_correct(Scripted(), x, labels, torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(a.correct, b.correct) and a.auc == b.auc


def test_deletion_to_correct_checks_its_inputs():
    x = scripted_images()
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="fractions"):
        deletion_to_correct(Scripted(), x, labels, torch.zeros(3, 10, 10), (0.1, 0.05))
    with pytest.raises(ValueError, match="maps must have shape"):
        deletion_to_correct(Scripted(), x, labels, torch.zeros(3, 9, 10))
    empty = deletion_to_correct(Scripted(), x[:0], labels[:0], torch.zeros(0, 10, 10))
    assert empty.correct.shape == (0, 4) and np.isnan(empty.auc)
