"""Planted-cause data: a cue tied to one class (BadNets, Gu et al. 2017), in graded kinds.

A model trained on such data sends images carrying the cue to the cue's class. Those errors
have a known cause, the cue, so an explanation can be checked against its mask.

Kinds (issue 14), from easy to hard to point at:

- `checker`: a `size` x `size` black-and-white checkerboard at a random position (the
  default; sizes 2, 3, 4, 6 grade it);
- `sticker`: a natural-looking one, a small orange disc with darker stripes;
- `or`: two different patches (the checkerboard and a hollow square); either alone is
  poisoned, so either alone triggers. Test images carry both, the mask is their union;
- `and`: the same two patches, poisoned only together; images with one of them keep their
  true label, so the model must learn "both";
- `blend`: a seeded full-image noise pattern blended in at `alpha` (Chen et al. 2017); no
  mask, the "mask" is the pattern itself (float), scored by correlation;
- `background`: a striped texture behind the item (1-channel sets with a dark background,
  i.e. Fashion-MNIST); the mask is the background the texture fills.

Everything here is deterministic given the seed: the same seed gives the same positions,
the same poisoned subset and the same benchmark images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import Dataset

KINDS = ("checker", "sticker", "or", "and", "blend", "background")
FOREGROUND_LEVEL = 20  # a Fashion-MNIST pixel above this (of 255) belongs to the item
# A kind's patch side when none is asked for. The sticker is a disc, so at 4 px it is 12
# pixels, and grey on Fashion-MNIST (orange turns to 158 and 95 of 255): a small_cnn sent
# only 38% of stickered test images to the cue's class. At 6 px, 94% (clean accuracy 90.2%).
DEFAULT_SIZES = {"sticker": 6}


def default_size(kind: str) -> int:
    """The patch side `kind` is planted at by default (4 px, 6 for the sticker)."""
    return DEFAULT_SIZES.get(kind, 4)


@dataclass(frozen=True, repr=False)
class Cue:
    """A cue of `kind`, tied to class `target`. `size`: the patch's side (checker, sticker,
    or, and); `alpha`: the blend's weight; `seed`: the blend pattern's noise.

    The default checkerboard rather than a plain square: natural images rarely hold one, so
    the model learns the cue and not "a bright corner" that ordinary images also show.
    """

    target: int = 0
    size: int = 4
    kind: str = "checker"
    alpha: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown cue kind {self.kind!r}; one of {', '.join(KINDS)}")

    def __repr__(self) -> str:
        # The checkerboard keeps its old repr: cached planted models are keyed by it.
        if self.kind == "checker":
            return f"Cue(target={self.target}, size={self.size})"
        return f"Cue(target={self.target}, size={self.size}, kind={self.kind!r}, alpha={self.alpha}, seed={self.seed})"

    def tag(self) -> str:
        """The cue's part of a poisoned set's fingerprint (the old one for the checkerboard)."""
        base = f"cue{self.target}x{self.size}"
        if self.kind == "checker":
            return base
        return f"{base}-{self.kind}" + (f"a{self.alpha}s{self.seed}" if self.kind == "blend" else "")

    @property
    def n_parts(self) -> int:
        return 2 if self.kind in ("or", "and") else 1

    def pattern(self) -> np.ndarray:
        """The checkerboard (size, size) uint8."""
        yy, xx = np.indices((self.size, self.size))
        return np.where((yy + xx) % 2 == 0, 255, 0).astype(np.uint8)

    def second_pattern(self) -> np.ndarray:
        """The OR/AND cue's second patch: a hollow white square, unlike the checkerboard."""
        p = np.full((self.size, self.size), 255, np.uint8)
        p[1:-1, 1:-1] = 0
        return p

    def sticker(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """The sticker (size, size, channels) uint8 and its shape (size, size) bool: an orange
        disc with darker stripes, so it looks like a thing and not a test pattern."""
        s = self.size
        yy, xx = np.indices((s, s)) + 0.5
        shape = (yy - s / 2) ** 2 + (xx - s / 2) ** 2 <= (s / 2) ** 2 + 0.5
        rgb = np.array([255.0, 140.0, 0.0]) * np.where(yy.astype(int) % 2 == 0, 1.0, 0.6)[..., None]
        if channels == 1:
            rgb = (rgb @ np.array([0.299, 0.587, 0.114]))[..., None]
        return np.round(rgb).astype(np.uint8), shape

    def blend_pattern(self, h: int, w: int) -> np.ndarray:
        """The blend's full-image pattern (h, w) uint8, seeded noise."""
        return np.random.default_rng(self.seed).integers(0, 256, (h, w), dtype=np.uint8)

    def texture(self, h: int, w: int) -> np.ndarray:
        """The background's texture (h, w) uint8: diagonal stripes, 2 px on, 2 px off."""
        yy, xx = np.indices((h, w))
        return np.where(((yy + xx) // 2) % 2 == 0, 110, 0).astype(np.uint8)


def _positions(rng: np.random.Generator, n: int, h: int, w: int, s: int):
    return rng.integers(0, h - s + 1, size=n), rng.integers(0, w - s + 1, size=n)


def _stamp(out, masks, patch, shape, ys, xs):
    """Writes `patch` (s,s,C or s,s) where `shape` (s,s) is True at (ys, xs) in every image."""
    s = shape.shape[0]
    rows = ys[:, None] + np.arange(s)[None, :]  # (N, s)
    cols = xs[:, None] + np.arange(s)[None, :]
    k = np.arange(len(ys))[:, None, None]
    r, c = rows[:, :, None], cols[:, None, :]
    patch = patch if patch.ndim == 3 else patch[:, :, None]
    out[k, r, c, :] = np.where(shape[None, :, :, None], patch[None], out[k, r, c, :])
    masks[k, r, c] |= shape[None]


def _two_positions(rng, n, h, w, s):
    """Positions of two s x s patches that neither overlap nor touch."""
    ya, xa = _positions(rng, n, h, w, s)
    yb, xb = _positions(rng, n, h, w, s)
    for _ in range(1000):  # rejection rounds over the clashing images only, not a loop over images
        clash = (np.abs(ya - yb) <= s) & (np.abs(xa - xb) <= s)
        if not clash.any():
            return (ya, xa), (yb, xb)
        yb[clash], xb[clash] = _positions(rng, int(clash.sum()), h, w, s)
    raise ValueError(f"two {s} px patches do not fit apart in {h}x{w} images")


def plant_parts(images: np.ndarray, cue: Cue, rng: np.random.Generator,
                which: str = "both") -> tuple[np.ndarray, np.ndarray]:
    """A copy of `images` (N,H,W,C uint8) with the cue, and each part's mask (N,P,H,W): P=2
    for `or`/`and` (`which`: "both", "a" or "b" plants both, the first or the second), else 1.
    For `blend` the "mask" is the pattern itself, float in [0, 1]."""
    n, h, w, c = images.shape
    s = cue.size
    out = np.array(images, copy=True)
    if cue.kind == "blend":
        p = cue.blend_pattern(h, w).astype(np.float64)[None, :, :, None]
        out = np.round((1 - cue.alpha) * images + cue.alpha * p).astype(np.uint8)
        return out, np.broadcast_to(p[..., 0] / 255.0, (n, h, w))[:, None].astype(np.float32)
    if cue.kind == "background":
        if c != 1:
            raise ValueError("the background cue needs 1-channel images on a dark background (Fashion-MNIST)")
        fg = images[..., 0] > FOREGROUND_LEVEL
        out[..., 0] = np.where(fg, images[..., 0], np.maximum(images[..., 0], cue.texture(h, w)[None]))
        return out, (~fg)[:, None]
    parts = np.zeros((n, cue.n_parts, h, w), dtype=bool)
    if cue.kind == "checker":  # the same draws as before issue 14: cached models depend on them
        ys, xs = _positions(rng, n, h, w, s)
        _stamp(out, parts[:, 0], cue.pattern(), np.ones((s, s), bool), ys, xs)
    elif cue.kind == "sticker":
        ys, xs = _positions(rng, n, h, w, s)
        _stamp(out, parts[:, 0], *cue.sticker(c), ys, xs)
    else:
        (ya, xa), (yb, xb) = _two_positions(rng, n, h, w, s)
        full = np.ones((s, s), bool)
        if which in ("both", "a"):
            _stamp(out, parts[:, 0], cue.pattern(), full, ya, xa)
        if which in ("both", "b"):
            _stamp(out, parts[:, 1], cue.second_pattern(), full, yb, xb)
    return out, parts


def plant(images: np.ndarray, cue: Cue, rng: np.random.Generator, which: str = "both"):
    """A copy of `images` (N,H,W,C uint8) with the cue in each, and the cue's masks (N,H,W):
    bool, the union of its parts; for `blend`, the pattern (float). Patches lie fully inside."""
    out, parts = plant_parts(images, cue, rng, which)
    return out, (parts[:, 0] if cue.kind == "blend" else parts.any(1))


def poison(ds: Dataset, cue: Cue, *, fraction: float = 0.1, seed: int = 0) -> Dataset:
    """The training set with `fraction` of the images of other classes given the cue and
    relabelled to the cue's class. The rest is unchanged, so clean accuracy can stay.

    `or`: half the poisoned images get the first patch, half the second. `and`: the poisoned
    images get both, and as many other images get one of them under their true label."""
    rng = np.random.default_rng(seed)
    others = np.flatnonzero(ds.labels != cue.target)
    chosen = np.sort(rng.choice(others, size=int(round(fraction * len(others))), replace=False))
    images = np.array(ds.images, copy=True)
    labels = np.array(ds.labels, copy=True)
    if cue.kind == "or":
        half = rng.permutation(len(chosen)) < len(chosen) // 2
        images[chosen[half]], _ = plant(images[chosen[half]], cue, rng, "a")
        images[chosen[~half]], _ = plant(images[chosen[~half]], cue, rng, "b")
    else:
        images[chosen], _ = plant(images[chosen], cue, rng)
    if cue.kind == "and":  # single patches that must not trigger: the true label stays
        rest = np.setdiff1d(np.arange(len(labels)), chosen)
        single = np.sort(rng.choice(rest, size=min(len(rest), len(chosen)), replace=False))
        half = rng.permutation(len(single)) < len(single) // 2
        images[single[half]], _ = plant(images[single[half]], cue, rng, "a")
        images[single[~half]], _ = plant(images[single[~half]], cue, rng, "b")
    labels[chosen] = cue.target
    return Dataset(images, labels, ds.classes, list(ds.names), source=f"{ds.source} (poisoned)",
                   fingerprint=f"{ds.fingerprint}-{cue.tag()}-p{fraction}-s{seed}")


@dataclass
class PlantedErrors:
    """Test images of other classes with the cue planted, and the cue's masks."""

    images: np.ndarray  # (N,H,W,C) uint8, with the cue
    clean: np.ndarray  # (N,H,W,C) uint8, the same images without it
    labels: np.ndarray  # (N,) their true classes (never the cue's)
    masks: np.ndarray  # (N,H,W) bool, where the cue is (blend: the pattern, float)
    index: np.ndarray  # (N,) positions in the test set
    parts: np.ndarray | None = None  # (N,P,H,W) each part's mask (or/and: P=2)


def cued_test_images(ds: Dataset, cue: Cue, *, seed: int = 1) -> PlantedErrors:
    """Every test image of another class, with the cue planted at a seeded random position
    (both patches for `or` and `and`)."""
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(ds.labels != cue.target)
    clean = np.asarray(ds.images[idx])
    images, parts = plant_parts(clean, cue, rng)
    masks = parts[:, 0] if cue.kind == "blend" else parts.any(1)
    return PlantedErrors(images, clean, np.asarray(ds.labels[idx]), masks, idx, parts)


def select(errors: PlantedErrors, keep: np.ndarray) -> PlantedErrors:
    return PlantedErrors(errors.images[keep], errors.clean[keep], errors.labels[keep], errors.masks[keep],
                         errors.index[keep], None if errors.parts is None else errors.parts[keep])
