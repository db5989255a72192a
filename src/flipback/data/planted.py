"""Planted-cause data: a small cue patch, tied to one class (BadNets, Gu et al. 2017).

A model trained on such data sends images carrying the cue to the cue's class. Those errors
have a known cause, the patch, so an explanation can be checked against its mask.

Everything here is deterministic given the seed: the same seed gives the same positions,
the same poisoned subset and the same benchmark images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import Dataset


@dataclass(frozen=True)
class Cue:
    """A `size` x `size` black-and-white checkerboard, tied to class `target`.

    A checkerboard rather than a plain square: natural images rarely hold one, so the model
    learns the cue and not "a bright corner" that ordinary images also show.
    """

    target: int = 0
    size: int = 4

    def pattern(self) -> np.ndarray:
        yy, xx = np.indices((self.size, self.size))
        return np.where((yy + xx) % 2 == 0, 255, 0).astype(np.uint8)


def plant(images: np.ndarray, cue: Cue, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `images` (N,H,W,C uint8) with the cue at a random position in each, and the
    cue's masks (N,H,W bool). The patch lies fully inside the image."""
    n, h, w, _ = images.shape
    s = cue.size
    ys = rng.integers(0, h - s + 1, size=n)
    xs = rng.integers(0, w - s + 1, size=n)
    rows = ys[:, None] + np.arange(s)[None, :]  # (N, s)
    cols = xs[:, None] + np.arange(s)[None, :]
    out = np.array(images, copy=True)
    masks = np.zeros((n, h, w), dtype=bool)
    k = np.arange(n)[:, None, None]
    out[k, rows[:, :, None], cols[:, None, :], :] = cue.pattern()[None, :, :, None]
    masks[k, rows[:, :, None], cols[:, None, :]] = True
    return out, masks


def poison(ds: Dataset, cue: Cue, *, fraction: float = 0.1, seed: int = 0) -> Dataset:
    """The training set with `fraction` of the images of other classes given the cue and
    relabelled to the cue's class. The rest is unchanged, so clean accuracy can stay."""
    rng = np.random.default_rng(seed)
    others = np.flatnonzero(ds.labels != cue.target)
    chosen = np.sort(rng.choice(others, size=int(round(fraction * len(others))), replace=False))
    images = np.array(ds.images, copy=True)
    labels = np.array(ds.labels, copy=True)
    images[chosen], _ = plant(images[chosen], cue, rng)
    labels[chosen] = cue.target
    return Dataset(images, labels, ds.classes, list(ds.names), source=f"{ds.source} (poisoned)",
                   fingerprint=f"{ds.fingerprint}-cue{cue.target}x{cue.size}-p{fraction}-s{seed}")


@dataclass
class PlantedErrors:
    """Test images of other classes with the cue planted, and the cue's masks."""

    images: np.ndarray  # (N,H,W,C) uint8, with the cue
    clean: np.ndarray  # (N,H,W,C) uint8, the same images without it
    labels: np.ndarray  # (N,) their true classes (never the cue's)
    masks: np.ndarray  # (N,H,W) bool, where the cue is
    index: np.ndarray  # (N,) positions in the test set


def cued_test_images(ds: Dataset, cue: Cue, *, seed: int = 1) -> PlantedErrors:
    """Every test image of another class, with the cue planted at a seeded random position."""
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(ds.labels != cue.target)
    clean = np.asarray(ds.images[idx])
    images, masks = plant(clean, cue, rng)
    return PlantedErrors(images, clean, np.asarray(ds.labels[idx]), masks, idx)


def select(errors: PlantedErrors, keep: np.ndarray) -> PlantedErrors:
    return PlantedErrors(errors.images[keep], errors.clean[keep], errors.labels[keep], errors.masks[keep],
                         errors.index[keep])
