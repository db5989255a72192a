"""Recurring causes: the pattern that the corrections of a class's errors keep removing.

Validation errors that the model sends to class p say, once corrected, where the change had
to go. When many of them had to change the same *pattern*, wherever it sits in the image,
that pattern is a candidate cause: a shortcut the model learned for p. Three steps, all
batched:

1. `find_causes`: for each predicted class, cut from every corrected error the s x s window
   of the original that holds the most change, and count how many of the class's other
   errors carry that window's pattern somewhere (normalized cross-correlation, NCC >= 0.8).
   The template is the window whose share among those errors exceeds by most its share
   among validation images the model sends elsewhere; it is a cause only if it is much more
   common in the errors (`lift`) and rare elsewhere: an edge, a flat patch or a common
   texture is everywhere, a trigger is not. The window is a fixed size and sits where the
   change was largest, so it may hold part of the pattern and some of the image around it:
   the template is then re-cut, wider, from the errors that carry it and trimmed to its
   *core*, the pixels on which they agree; that is what the scan matches.
2. `scan`: the best NCC of the template over every training image labelled p, and where.
3. `cover`: the same images with that window replaced by a blur of its surroundings; the
   audit verifies a suspect when the model's answer then leaves p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MATCH = 0.8  # NCC at which a window "carries" a template
MIN_ERRORS = 3
MIN_LIFT = 3.0
# ...and rare where the model answers otherwise. On CIFAR-10's carved validation split, 5 x 5
# windows of natural texture recur in 72-84% of a class's errors but also in 18-25% of the other
# images (lift 3.6-4): common textures, not a cause. A planted trigger's share elsewhere is 0.
MAX_BACKGROUND = 0.05
MIN_SUPPORT = 0.2  # share of a class's errors that must carry the template
_FLAT = 0.05  # windows whose pixels spread less than this (std, in [0,1] units) match nothing
# A window pixel is part of the pattern's core when the carriers' aligned windows agree on it
# (std across them below this, in [0,1] units); the image around a pattern varies far more.
CORE_SPREAD = 0.1
MIN_CORE = 0.25  # a core smaller than this share of the window is not trusted: the whole window is used


@dataclass
class Cause:
    """A pattern that corrections of errors sent to class `pred` keep removing."""

    pred: int
    template: np.ndarray  # (C, s, s) float32 in [0, 1]: original pixels of the medoid error's window
    n_errors: int  # corrected validation errors sent to `pred`
    support: float  # share of them that carry the template
    background: float  # share of validation images the model sends elsewhere that carry it
    source: int  # which error (position in the inputs) the template was cut from
    true_classes: dict  # true class -> how many supporting errors had it
    core: np.ndarray | None = None  # (s, s) bool: the pixels the scan matches; None: all of them

    @property
    def size(self) -> int:
        return int(self.template.shape[-1])

    @property
    def lift(self) -> float:
        return self.support / max(self.background, 1e-3)


def _nchw(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images))
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)


def ncc(images: torch.Tensor, templates: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized cross-correlation of every (C, s, s) template at every position of every
    image: (N, C, H, W) x (T, C, s, s) -> (N, T, H-s+1, W-s+1), in [-1, 1]; 0 where the
    window or the template is flat. `masks` (T, s, s) bool, if given, limits each template
    to its pixels (means, spreads and products over those pixels only)."""
    c, s = images.shape[1], templates.shape[-1]
    m = torch.ones_like(templates) if masks is None else \
        masks.to(templates.dtype)[:, None].expand_as(templates).contiguous()
    n = m.sum(dim=(1, 2, 3))  # pixels (times channels) each template compares
    t = (templates - (templates * m).sum(dim=(1, 2, 3), keepdim=True) / n[:, None, None, None]) * m
    floor = _FLAT * n.sqrt()  # the norm of a zero-mean window with that std
    t_norm = t.flatten(1).norm(dim=1)
    t = t / t_norm.clamp_min(floor)[:, None, None, None]
    numerator = F.conv2d(images, t)  # t has zero mean on its pixels, so sum(x t) = sum((x - mean_x) t)
    total = F.conv2d(images, m)
    squares = F.conv2d(images * images, m)
    spread = (squares - total * total / n[None, :, None, None]).clamp_min(0).sqrt()
    out = numerator / torch.maximum(spread, floor[None, :, None, None])
    flat = (spread < floor[None, :, None, None]) | (t_norm < floor)[None, :, None, None]
    return out.masked_fill(flat, 0.0).clamp(-1, 1)


def best_match(images: torch.Tensor, template: torch.Tensor, batch: int = 2048,
               core: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the best NCC of `template` (C, s, s), limited to its `core` (s, s) bool if
    given, and the (y, x) of its window's corner."""
    scores, where = [], []
    for start in range(0, len(images), batch):
        m = ncc(images[start:start + batch], template[None], None if core is None else core[None])[:, 0]
        flat = m.flatten(1)
        best = flat.max(1).values
        # Of matches equal to 1e-4 the first (top-left) one: a periodic pattern matches a part
        # of itself at several shifts, and the same choice for every image keeps them aligned.
        arg = (flat >= best[:, None] - 1e-4).float().argmax(1)
        scores.append(best)
        where.append(torch.stack([arg // m.shape[-1], arg % m.shape[-1]], 1))
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, 2), np.int64)
    return torch.cat(scores).numpy(), torch.cat(where).numpy()


def window_size(height: int, width: int) -> int:
    """The side of the windows cut from corrections: a seventh of the image, at least 3 px
    (4 px at 28 or 32 px, 32 px at 224)."""
    return max(3, round(min(height, width) / 7))


def _windows(originals: torch.Tensor, change: torch.Tensor, s: int) -> tuple[torch.Tensor, np.ndarray]:
    """The s x s window of each original holding the most change (summed per pixel over
    channels), and its corner."""
    heat = F.avg_pool2d(change.abs().sum(1, keepdim=True), s, stride=1)[:, 0]
    arg = heat.flatten(1).argmax(1)
    ys, xs = (arg // heat.shape[-1]).numpy(), (arg % heat.shape[-1]).numpy()
    patches = torch.stack([originals[i, :, y:y + s, x:x + s] for i, (y, x) in enumerate(zip(ys, xs))])
    return patches, np.stack([ys, xs], 1)


def find_causes(originals, corrected, true, pred, background_images, background_pred, *,
                size: int | None = None, min_errors: int = MIN_ERRORS, min_lift: float = MIN_LIFT,
                min_support: float = MIN_SUPPORT, max_background: float = MAX_BACKGROUND,
                max_errors: int = 300) -> list[Cause]:
    """The recurring causes among corrected validation errors.

    originals, corrected: (N, H, W, C) uint8 (or [0,1] floats) of the corrected errors only;
    true, pred: their labels and the model's answers on the originals. background_images and
    background_pred: validation images and the model's answers on them, to measure how common
    a pattern is where the model does not answer p. At most `max_errors` per class are used
    (the first ones), which bounds the n^2 template comparisons."""
    x, xc = _nchw(originals), _nchw(corrected)
    true, pred = np.asarray(true), np.asarray(pred)
    bg, bg_pred = _nchw(background_images), np.asarray(background_pred)
    s = size or window_size(x.shape[2], x.shape[3])
    causes = []
    for p in np.unique(pred):
        rows = np.flatnonzero(pred == p)[:max_errors]
        if len(rows) < min_errors:
            continue
        patches, _ = _windows(x[rows], xc[rows] - x[rows], s)
        # support[i, j]: does error j carry error i's window? (its own window always does)
        carried = torch.cat([ncc(x[rows[k:k + 256]], patches).flatten(2).max(2).values
                             for k in range(0, len(rows), 256)]).T >= MATCH  # (templates, errors)
        support = carried.float().mean(1)
        # How common each template is where the model does not answer p: edges and flat
        # shading are everywhere (lift about 1), a learned trigger is not.
        others = bg[bg_pred != p][:1000]
        background = torch.cat([ncc(others[k:k + 256], patches).flatten(2).max(2).values
                                for k in range(0, len(others), 256)]).ge(MATCH).float().mean(0) \
            if len(others) else torch.zeros(len(rows))
        best = int((support - background).argmax())
        cause = Cause(int(p), patches[best].numpy(), len(rows), float(support[best]), float(background[best]),
                      int(rows[best]),
                      {int(c): int(n) for c, n in zip(*np.unique(true[rows][carried[best].numpy()], return_counts=True))})
        if cause.support >= min_support and cause.lift >= min_lift and cause.background <= max_background and \
                cause.support * len(rows) >= min_errors:
            template, core = _core(patches[best], x[rows][carried[best]], others, max_background)
            cause.template, cause.core = template.numpy(), None if core is None else core.numpy()
            causes.append(cause)
    return causes


def _core_once(template: torch.Tensor, mask, carriers: torch.Tensor, others: torch.Tensor, max_background: float):
    """One pass of `_core`; `mask` limits the template's matching to its core. The pattern itself: (template, core), the template re-cut from the carriers and trimmed
    to the pixels on which they agree, the core a bool mask of it (None when it is all of it).

    The window was cut where a correction changed most, so it may hold only part of the
    pattern and some of what surrounds it. Around each carrier's best match a window wider by
    half its side on every side is cut out (beyond the image's edge: missing); a pixel whose
    values spread less than CORE_SPREAD across the carriers (most of them having it) belongs
    to the pattern, the others to whatever surrounds it. The template is the carriers'
    median there, cut to the core's bounding box, so that a pattern at the image's edge can be
    matched too. It is kept only if the core is not too small and still rare where the model
    answers otherwise: it never matches more of the background than the window did."""
    s = template.shape[-1]
    r = max(1, s // 2)
    if len(carriers) < MIN_ERRORS:
        return template, mask
    _, corners = best_match(carriers, template, core=mask)
    # Padded with NaN, so that a carrier near the edge still counts for the pixels it has.
    padded = F.pad(carriers, (r, r, r, r), value=float("nan"))
    corners, side = torch.as_tensor(corners), s + 2 * r  # corners in the padded images
    rows = corners[:, :1] + torch.arange(side)[None]  # (K, side)
    cols = corners[:, 1:] + torch.arange(side)[None]
    k = torch.arange(len(carriers))[:, None, None]
    aligned = padded.permute(0, 2, 3, 1)[k, rows[:, :, None], cols[:, None, :]]  # (K, side, side, C)
    seen = (~aligned.isnan()).all(-1).sum(0)  # carriers that have each pixel
    mean = aligned.nanmean(0)
    spread = ((aligned - mean).pow(2).nansum(0) / (seen[..., None] - 1).clamp_min(1)).sqrt()
    # every channel agrees, over most of the carriers
    core = (spread.amax(-1) < CORE_SPREAD) & (seen >= max(MIN_ERRORS, (len(carriers) + 1) // 2))
    if not bool(core.any()):
        return template, mask
    ys, xs = torch.nonzero(core, as_tuple=True)
    # The core's bounding box, made square (templates, boxes and covers are square): the
    # shorter side grows around the core, inside the window; the added pixels are masked out.
    top, left = int(ys.min()), int(xs.min())
    height, width = int(ys.max()) + 1 - top, int(xs.max()) + 1 - left
    edge = max(height, width)
    top = min(max(0, top - (edge - height) // 2), side - edge)
    left = min(max(0, left - (edge - width) // 2), side - edge)
    box = (slice(top, top + edge), slice(left, left + edge))
    core = core[box]
    if core.float().mean() < MIN_CORE or core.numel() < 4:
        return template, mask
    trimmed = aligned.nanmedian(0).values.permute(2, 0, 1)[:, box[0], box[1]].nan_to_num(0.0).contiguous()
    mask = None if core.all() else core
    if len(others):
        elsewhere = torch.cat([ncc(others[i:i + 256], trimmed[None], None if mask is None else mask[None])
                               .flatten(2).max(2).values for i in range(0, len(others), 256)]).ge(MATCH).float().mean()
        if float(elsewhere) > max_background:
            return template, mask
    return trimmed, mask


def _core(template: torch.Tensor, carriers: torch.Tensor, others: torch.Tensor, max_background: float):
    """The template re-cut and trimmed to the pattern (see `_core_once`), again from each new
    template until its size stops changing (at most three passes): a window that held only
    part of the pattern aligns the carriers on that part, and the next pass, aligned on the
    part itself, sees all of it."""
    mask = None
    for _ in range(3):
        new, new_mask = _core_once(template, mask, carriers, others, max_background)
        if new is template or new.shape == template.shape:
            return new, new_mask
        template, mask = new, new_mask
    return template, mask


def cover(images: torch.Tensor, corners: np.ndarray, s: int) -> torch.Tensor:
    """`images` (N, C, H, W) with the s x s window at each corner replaced by a blur of the
    image around it (a box blur three windows wide), which keeps the local colour and drops
    the pattern."""
    k = 3 * s + (1 - (3 * s) % 2)  # odd, so that the blur stays centred
    blurred = F.avg_pool2d(F.pad(images, (k // 2,) * 4, mode="replicate"), k, stride=1)
    h, w = images.shape[2:]
    yy = torch.arange(h)[None, :, None]
    xx = torch.arange(w)[None, None, :]
    ys, xs = torch.as_tensor(corners[:, 0])[:, None, None], torch.as_tensor(corners[:, 1])[:, None, None]
    inside = ((yy >= ys) & (yy < ys + s) & (xx >= xs) & (xx < xs + s))[:, None]
    return torch.where(inside, blurred, images)
