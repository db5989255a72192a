"""Planted-cause data: deterministic cue placement, poisoning and benchmark images."""

import numpy as np

from flipback.data import Dataset
from flipback.data.planted import Cue, cued_test_images, plant, poison


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
