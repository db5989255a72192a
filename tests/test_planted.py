"""Planted-cause data: deterministic cue placement, poisoning and benchmark images."""

import numpy as np

from flipback.data import Dataset
from flipback.data.planted import KINDS, Cue, cued_test_images, plant, plant_parts, poison
import pytest


def _dataset(n=200, h=12, w=10, c=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    labels = np.arange(n) % classes
    return Dataset(images, labels, [f"c{i}" for i in range(classes)], [f"{i}.png" for i in range(n)],
                   fingerprint="synthetic")


def test_plant_puts_the_checkerboard_inside_the_image_where_the_mask_says():
    ds = _dataset()
    cue = Cue(target=1, size=3)
    out, masks = plant(ds.images, cue, np.random.default_rng(5))
    assert masks.sum((1, 2)).tolist() == [9] * len(ds)
    for img, orig, m in zip(out, ds.images, masks):
        ys, xs = np.nonzero(m)
        patch = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert (patch == cue.pattern()[:, :, None]).all()  # every channel carries the pattern
        assert (img[~m] == orig[~m]).all()  # nothing else changed
    positions = {tuple(np.argwhere(m)[0]) for m in masks}
    assert len(positions) > 20  # random positions, not one spot


def test_planting_is_deterministic_given_the_seed():
    ds = _dataset()
    a = plant(ds.images, Cue(), np.random.default_rng(3))
    b = plant(ds.images, Cue(), np.random.default_rng(3))
    c = plant(ds.images, Cue(), np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_poison_relabels_a_fraction_of_the_other_classes_and_nothing_else():
    ds = _dataset(n=400)
    cue = Cue(target=2, size=4)
    p = poison(ds, cue, fraction=0.1, seed=0)
    changed = np.any(p.images != ds.images, axis=(1, 2, 3))
    others = ds.labels != 2
    assert changed.sum() == round(0.1 * others.sum())
    assert not changed[~others].any()  # the cue's own class is never touched
    assert (p.labels[changed] == 2).all()
    assert np.array_equal(p.labels[~changed], ds.labels[~changed])
    assert np.array_equal(poison(ds, cue, fraction=0.1, seed=0).images, p.images)
    assert p.fingerprint != ds.fingerprint


def test_cued_test_images_cover_every_other_class_image_once():
    ds = _dataset(n=100)
    e = cued_test_images(ds, Cue(target=0, size=4))
    assert (e.labels != 0).all() and len(e.labels) == (ds.labels != 0).sum()
    assert np.array_equal(e.clean, ds.images[e.index])
    assert np.array_equal(e.images[~e.masks], e.clean[~e.masks])


# Issue 14: graded cue kinds.

def _fmnist_like(n=120, classes=4, seed=0):
    """1-channel items on a black background, like Fashion-MNIST: a bright block in the middle."""
    images = np.zeros((n, 28, 28, 1), np.uint8)
    images[:, 8:20, 9:19] = np.random.default_rng(seed).integers(60, 256, (n, 12, 10, 1), dtype=np.uint8)
    labels = np.arange(n) % classes
    return Dataset(images, labels, [f"c{i}" for i in range(classes)], [f"{i}.png" for i in range(n)],
                   fingerprint="fmnist-like")


def test_the_checkerboard_keeps_its_old_repr_and_fingerprint():
    # Cached planted models are keyed by these strings; they must not move.
    assert repr(Cue(target=0, size=4)) == "Cue(target=0, size=4)" and Cue().tag() == "cue0x4"
    assert "kind='and'" in repr(Cue(kind="and"))
    assert len({Cue(kind=k).tag() for k in KINDS}) == len(KINDS)
    with pytest.raises(ValueError):
        Cue(kind="nope")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_deterministic_and_changes_only_its_mask(kind):
    ds = _fmnist_like() if kind == "background" else _dataset(h=28, w=28)
    cue = Cue(target=1, size=3, kind=kind)
    a = plant_parts(ds.images, cue, np.random.default_rng(3))
    b = plant_parts(ds.images, cue, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    out, parts = a
    assert out.shape == ds.images.shape and out.dtype == np.uint8
    assert parts.shape == (len(ds), cue.n_parts, 28, 28)
    if kind == "blend":  # everywhere, weakly: |change| <= alpha * 255, and the mask is the pattern
        assert parts.dtype == np.float32 and np.allclose(parts[:, 0], cue.blend_pattern(28, 28) / 255.0)
        assert np.abs(out.astype(int) - ds.images).max() <= round(0.1 * 255) + 1
        return
    mask = parts.any(1)
    assert mask.any(axis=(1, 2)).all()
    assert (out[~mask] == ds.images[~mask]).all()  # nothing outside the mask changed
    if kind != "background":
        changed = np.any(out != ds.images, axis=3)
        assert changed.sum() > 0.5 * mask.sum()  # the cue mostly shows (random pixels may match it)


def test_two_patches_never_overlap_and_each_part_is_its_own_pattern():
    ds = _dataset(n=300, h=28, w=28)
    cue = Cue(target=0, size=4, kind="and")
    out, parts = plant_parts(ds.images, cue, np.random.default_rng(0))
    assert (parts.sum((2, 3)) == 16).all() and not (parts[:, 0] & parts[:, 1]).any()
    for k in range(0, 300, 37):
        for p, pattern in ((0, cue.pattern()), (1, cue.second_pattern())):
            ys, xs = np.nonzero(parts[k, p])
            assert (out[k, ys.min():ys.max() + 1, xs.min():xs.max() + 1] == pattern[:, :, None]).all()
    only_a = plant_parts(ds.images, cue, np.random.default_rng(0), "a")[1]
    assert only_a[:, 0].any((1, 2)).all() and not only_a[:, 1].any()


def test_the_sticker_is_a_coloured_disc_not_a_square():
    cue = Cue(size=6, kind="sticker")
    rgb, shape = cue.sticker(3)
    assert not shape[0, 0] and shape[3, 3] and 20 <= shape.sum() < 36
    assert (rgb[..., 0] > rgb[..., 2]).all()  # orange: red above blue
    assert len(np.unique(rgb[..., 1])) == 2  # stripes: texture, not a flat colour
    assert cue.sticker(1)[0].shape == (6, 6, 1)


def test_the_background_cue_fills_the_background_and_spares_the_item():
    ds = _fmnist_like()
    out, masks = plant(ds.images, Cue(kind="background"), np.random.default_rng(0))
    assert np.array_equal(masks[0], ~(ds.images[0, ..., 0] > 20))
    assert (out[:, 8:20, 9:19] == ds.images[:, 8:20, 9:19]).all()
    assert (out[~masks] == ds.images[~masks]).all() and (out[masks] > 0).mean() > 0.4
    with pytest.raises(ValueError):
        plant(_dataset().images, Cue(kind="background"), np.random.default_rng(0))


def test_or_poisons_each_patch_alone_and_and_shows_single_patches_under_the_true_label():
    ds = _dataset(n=400, h=28, w=28)
    for kind in ("or", "and"):
        cue = Cue(target=2, size=3, kind=kind)
        p = poison(ds, cue, fraction=0.1, seed=0)
        changed = np.any(p.images != ds.images, axis=(1, 2, 3))
        relabelled = p.labels != ds.labels
        n = round(0.1 * (ds.labels != 2).sum())
        assert relabelled.sum() == n and (p.labels[relabelled] == 2).all()
        # how many patches each changed image holds: the first patch is the checkerboard
        a = _holds(p.images, ds.images, cue.pattern())
        b = _holds(p.images, ds.images, cue.second_pattern())
        if kind == "or":  # every poisoned image has exactly one patch, both kinds used
            assert changed.sum() == n and ((a ^ b) == relabelled).all()
            assert a[relabelled].sum() == n // 2 and b[relabelled].sum() == n - n // 2
        else:  # poisoned: both; as many others: one, and their label stays
            assert (a & b)[relabelled].all() and changed.sum() == 2 * n
            single = changed & ~relabelled
            assert single.sum() == n and ((a ^ b)[single]).all()
            assert np.array_equal(p.labels[single], ds.labels[single])
        assert np.array_equal(poison(ds, cue, fraction=0.1, seed=0).images, p.images)


def _holds(images, orig, pattern):
    """Per image: whether some changed window equals `pattern` on every channel."""
    s = pattern.shape[0]
    win = np.lib.stride_tricks.sliding_window_view(images, (s, s), axis=(1, 2))  # (N,H',W',C,s,s)
    hit = (win == pattern[None, None, None, None]).all(axis=(3, 4, 5))
    moved = np.lib.stride_tricks.sliding_window_view(np.any(images != orig, axis=3), (s, s), axis=(1, 2)).any((3, 4))
    return (hit & moved).any((1, 2))


def test_cued_test_images_carry_both_patches_for_or_and():
    ds = _dataset(n=100, h=28, w=28)
    e = cued_test_images(ds, Cue(target=0, size=3, kind="or"))
    assert e.parts.shape == (len(e.labels), 2, 28, 28) and e.parts.any((2, 3)).all()
    assert np.array_equal(e.masks, e.parts.any(1))


def test_fine_tune_subset_is_drawn_by_the_seed():
    from flipback.runs.planted import subset_rows

    first = subset_rows(1000, 200, 0)
    # Seed 0 keeps the draw every earlier cached model was fine-tuned on.
    assert np.array_equal(first, np.sort(np.random.default_rng(0).choice(1000, size=200, replace=False)))
    assert np.array_equal(first, subset_rows(1000, 200, 0))
    other = subset_rows(1000, 200, 1)
    assert len(np.unique(other)) == 200 and other.max() < 1000
    assert len(np.intersect1d(first, other)) < 100  # about 40 shared by chance, not the same subset


def test_the_sticker_is_planted_larger_by_default_and_the_rest_at_4px():
    from flipback.data.planted import default_size

    assert default_size("sticker") == 6
    assert {default_size(k) for k in KINDS if k != "sticker"} == {4}


def test_one_uncued_control_serves_every_cue(tmp_path, monkeypatch):
    # The control never sees the cue: a second kind trains only its cued model.
    from flipback.runs import planted as runs_planted

    monkeypatch.setenv("FLIPBACK_CACHE", str(tmp_path))
    trained = []

    def fake_train(base, ds, out, show_progress, log, seed=0):
        trained.append(out.name)
        return f"small_cnn:{out}"

    monkeypatch.setattr(runs_planted, "_train", fake_train)
    monkeypatch.setattr(runs_planted, "_predict", lambda spec, k, images: np.zeros(len(images), int))
    ds = _dataset(n=60, h=28, w=28)
    for kind in ("checker", "sticker"):
        runs_planted.planted_models(ds, ds, Cue(target=0, size=4, kind=kind), show_progress=False)
    controls = [t for t in trained if "-control-" in t]
    cued = [t for t in trained if "-cued-" in t]
    assert len(set(controls)) == 1 and len(set(cued)) == 2
