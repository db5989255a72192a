"""Shrink verified corrections toward the original image, spending oracle queries.

A change that transferred from a surrogate overshoots: it was pushed until the surrogate
was confident, so the target's boundary usually lies well inside it. Given corrections the
oracle has verified, each query here tries a smaller one, and a try is kept only when the
oracle says it is still correct and it is smaller (L2) than the best so far:

1. **Line search back toward the original** (bisection on the factor t of the change
   t * delta, rounded to the grid). This alone is the "plain binary search" baseline.
2. **Steps along the boundary.**
   - With scores (`estimate`): every answer is a measurement of the target's margin, so the
     target's own gradient is estimated in the span of the changes asked so far (least
     squares), as in the prior-guided gradient estimates of P-RGF (Cheng et al. 2019) and
     qFool (Liu et al. 2019). Each round probes along the surrogate's normals toward the
     target's strongest rival classes, then asks for a step toward the smallest change that
     the fitted linear margin says is correct (a trust region); a wrong guess is one more
     measurement.
   - With labels only (`rotate`), in the spirit of HopSkipJump (Chen et al. 2020) with the
     surrogate's gradient where it estimates the target's by sampling: from a point just
     inside the target's boundary, the change is rotated toward the surrogate's normal at the
     same length (one query), and a bisection along the new direction shortens it where it
     is accepted. A refused rotation halves the angle for that image; an accepted one widens it.
     One normal holds little: after two refusals in a row an image turns to the normal toward
     the surrogate's next strongest rival class (`rivals` of them in turn), which widens the
     directions tried where the first has been used up.

Everything is batched over images, and the attack call's budgets hold: an image whose
budget is spent is never sent, and each stage stops per image (early stop) when it is.
"""

from __future__ import annotations

import torch

from ..targets.guide import margin
from .base import AttackCall, score_margin
from .fast import log_probabilities


def _image(call: AttackCall, p: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """Pixels `p` (1/255 units) plus `change`, in the box, as [0, 1] images on the grid."""
    x = (p + change).clamp(0, 255)
    if call.pixels == "uint8":
        x = torch.round(x)
    return (x / 255).view(-1, *call.x0.shape[1:])


def current_change(call: AttackCall, rows: torch.Tensor) -> torch.Tensor:
    """The best verified change of `rows` so far, in 1/255 units (integers on the 8-bit grid)."""
    p = call.x0[rows].flatten(1) * 255
    c = call.corrected[rows].flatten(1) * 255
    if call.pixels == "uint8":
        c, p = torch.round(c), torch.round(p)
    return c - p


def _asker(call: AttackCall, rows, p, observe=None):
    """ask(k, change): ask the target about p + change for local rows k, keep the answer where
    it is correct and smaller than the best so far, and return the verdict. `observe(k,
    actual change, verdict)`, if given, sees every answer first."""
    def ask(k: torch.Tensor, change: torch.Tensor):
        x = _image(call, p[k], change)
        verdict = call.check(rows[k], x)
        actual = x.flatten(1) * 255 - p[k]
        if observe is not None:
            observe(k, actual, verdict)
        best = current_change(call, rows[k]).norm(dim=1)
        call.record(rows[k], x, verdict, where=verdict.ok & (actual.norm(dim=1) < best))
        return verdict
    return ask


def _bisect(call: AttackCall, rows, p, direction, lo, hi, steps: int, keep: int = 0, ask=None) -> None:
    """Bisection on t in (lo, hi] for the shortest correct p + t * direction, where hi is
    known (or assumed) correct, for rows with more than `keep` queries left. `ask` (see
    `_asker`, the default) asks and keeps each try that is correct and smaller than the best."""
    ask = ask or _asker(call, rows, p)
    for _ in range(steps):
        k = (call.left(rows) > keep).nonzero().squeeze(1)
        if len(k) == 0:
            break
        t = (lo[k] + hi[k]) / 2
        verdict = ask(k, t[:, None] * direction[k])
        hi[k] = torch.where(verdict.ok, t, hi[k])
        lo[k] = torch.where(verdict.asked & ~verdict.ok, t, lo[k])


def _rival_margin(turn: torch.Tensor):
    """The objective "true logit minus the logit of the turn-th strongest other class", `turn`
    per image (0: the strongest, which is `margin`)."""
    def objective(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rival = z.scatter(1, t[:, None], float("-inf")).argsort(1, descending=True).gather(1, turn[:, None])
        return z.gather(1, t[:, None]).squeeze(1) - z.gather(1, rival).squeeze(1)
    return objective


def shrink(call: AttackCall, rows: torch.Tensor, *, line_steps: int = 5, rounds: int | None = None,
           rotate: float = 0.5, radius_steps: int = 3, floor: float = 0.5, rivals: int = 1,
           patience: int = 2, keep: int = 0) -> None:
    """Shrink the verified corrections of `rows` (all corrected) with what budget each has.

    `line_steps` queries of bisection along the change, then rounds of a rotation toward the
    surrogate's normal (one query) and, where it is accepted, `radius_steps` of bisection of
    its length in (`floor`, 1]; `rounds` None: until the budgets are spent (or 100 rounds).
    `rotate`: the first rotation's weight on the normal (0: line search only). `rivals`: the
    normals toward this many of the surrogate's strongest rival classes are taken in turn, an
    image moving to the next after `patience` refused rotations in a row (1: always the
    strongest). `keep`: queries per image left unspent, for a later stage."""
    if len(rows) == 0:
        return
    p = call.x0[rows].flatten(1) * 255
    if call.pixels == "uint8":
        p = torch.round(p)
    n, dev = len(rows), call.device
    if line_steps:
        # The line search gains most per query: `keep` applies only to the stages after it.
        _bisect(call, rows, p, current_change(call, rows), torch.zeros(n, device=dev), torch.ones(n, device=dev),
                line_steps)
    if not rotate:
        return
    beta = torch.full((n,), float(rotate), device=dev)
    turn = torch.zeros(n, dtype=torch.long, device=dev)  # which rival's normal each image rotates toward
    refusals = torch.zeros(n, dtype=torch.long, device=dev)  # in a row
    rivals = max(1, min(rivals, call.num_classes - 1))
    for _ in range(100 if rounds is None else rounds):
        live = (call.left(rows) > keep).nonzero().squeeze(1)
        if len(live) == 0:
            break
        r, pl = rows[live], p[live]
        delta = current_change(call, r)
        length = delta.norm(dim=1, keepdim=True)
        # The surrogate's normal at the corrected point toward the image's current rival (free).
        objective = margin if rivals == 1 else _rival_margin(turn[live] % rivals)
        _, _, grad = call.steer(r, _image(call, pl, delta), objective)
        normal = grad.flatten(1)
        normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-12)
        b = beta[live, None]
        direction = (1 - b) * delta / length.clamp_min(1e-12) + b * normal
        direction = length * direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        x = _image(call, pl, direction)
        verdict = call.check(r, x)
        norm = (x.flatten(1) * 255 - pl).norm(dim=1)
        smaller = verdict.ok & (norm < length.squeeze(1))
        call.record(r, x, verdict, where=smaller)
        beta[live] = torch.where(verdict.ok, (beta[live] * 1.5).clamp(max=1.0),
                                 torch.where(verdict.asked, beta[live] / 2, beta[live]))
        refused = verdict.asked & ~verdict.ok
        refusals[live] = torch.where(refused, refusals[live] + 1, torch.where(verdict.ok, 0, refusals[live]))
        moving = refusals[live] >= patience
        turn[live] += moving.long()
        refusals[live] = torch.where(moving, 0, refusals[live])
        went = verdict.ok
        if bool(went.any()):
            k = went.nonzero().squeeze(1)
            m = len(k)
            _bisect(call, r[k], pl[k], direction[k], torch.full((m,), floor, device=dev), torch.ones(m, device=dev),
                    radius_steps, keep)


def _oracle_margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The target's margin in log-probabilities (NaN where it gave no scores)."""
    m = score_margin(log_probabilities(scores), labels)
    return torch.where(torch.isfinite(scores).all(1), m, torch.full_like(m, float("nan")))


def _low_frequency(ids: torch.Tensor, shape, salt: int, device) -> torch.Tensor:
    """Smooth pseudo-random directions (N, C*H*W), one per image id and `salt`: noise on a grid
    4 times coarser, upsampled. Drawn from a counter-based hash of (id, salt, position), so an
    image gets the same directions whatever batch it is in (a resumed run repeats itself)."""
    c, h, w = shape
    hc, wc = max(1, h // 4), max(1, w // 4)
    pos = torch.arange(c * hc * wc, dtype=torch.float64, device=device)
    key = ids.to(device, torch.float64)[:, None] * 12.9898 + pos[None] * 78.233 + salt * 37.719
    noise = torch.frac(torch.sin(key) * 43758.5453) * 2 - 1
    noise = noise.float().view(len(ids), c, hc, wc)
    return torch.nn.functional.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False).flatten(1)


def estimate(call: AttackCall, rows: torch.Tensor, *, line_steps: int = 5, probes: int = 2, rounds: int | None = None,
             probe_size: float = 0.5, aim: float = 0.1, memory: int = 24, reach: float = 0.5,
             keep: int = 0) -> None:
    """Scores only: shrink the verified corrections of `rows` with the target's gradient as
    estimated from its answers. First `line_steps` of line search back along the change; then
    each round asks `probes` points around the best change (along the surrogate's normals
    toward the target's strongest rival classes, random smooth directions where there are
    fewer classes; each `probe_size` times the change's length), fits the target's margin as linear in the span of every change
    asked (the last `memory` of them), and asks for the smallest change whose fitted margin
    is `aim`, or a share `reach` of the way there (adapted per image). Keeps each answer that
    is correct and smaller; `keep` queries per image are left."""
    if len(rows) == 0 or call.oracle.output != "scores":
        return
    n, dev = len(rows), call.device
    p = call.x0[rows].flatten(1) * 255
    if call.pixels == "uint8":
        p = torch.round(p)
    npix = p.shape[1]
    offsets = torch.zeros(n, memory, npix, device=dev)  # changes asked, in 1/255 units
    margins = torch.zeros(n, memory, device=dev)
    filled = torch.zeros(n, memory, dtype=torch.bool, device=dev)
    slot = torch.zeros(n, dtype=torch.long, device=dev)
    labels = call.labels[rows]
    reach = torch.full((n,), float(reach), device=dev)

    def measure(k: torch.Tensor, actual: torch.Tensor, verdict):
        """Every answer with scores is a measurement of the target's margin at x0 + actual."""
        m = _oracle_margin(verdict.scores, labels[k])
        stored = verdict.asked & torch.isfinite(m)
        if bool(stored.any()):
            kk, at = k[stored], slot[k[stored]] % memory
            offsets[kk, at], margins[kk, at], filled[kk, at] = actual[stored], m[stored], True
            slot[kk] += 1

    ask = _asker(call, rows, p, observe=measure)

    # The line search along the transferred change, its answers kept as measurements; before
    # anything is kept for later stages: it gains most per query.
    _bisect(call, rows, p, current_change(call, rows), torch.zeros(n, device=dev), torch.ones(n, device=dev),
            line_steps, ask=ask)
    for round_ in range(100 if rounds is None else rounds):
        live = (call.left(rows) > keep + probes).nonzero().squeeze(1)
        if len(live) == 0:
            break
        base = current_change(call, rows[live])
        base_m = _oracle_margin(call.scores[rows[live]], labels[live])
        length = base.norm(dim=1, keepdim=True).clamp_min(1.0)
        # Probes: the surrogate's normals between the true class and each of the target's
        # strongest other classes at the best change (free); on CIFAR-10 the first of them is
        # better aligned with the target's own gradient than the transferred change, and each
        # further one widens the span the estimate lives in. Smooth random directions where
        # there are fewer classes than probes.
        xb = _image(call, p[live], base)
        rivals = call.scores[rows[live]].scatter(1, labels[live, None], float("-inf")).argsort(1, descending=True)
        for j in range(probes):
            if j < call.num_classes - 1:
                rival = rivals[:, j]
                _, _, grad = call.steer(rows[live], xb, lambda z, t, r=rival: z.gather(1, t[:, None]).squeeze(1)
                                        - z.gather(1, r[:, None]).squeeze(1))
                d = grad.flatten(1)
            else:
                d = _low_frequency(call.ids[rows[live].cpu()], call.x0.shape[1:], probes * round_ + j, dev)
            d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
            ask(live, base + probe_size * length * d)
        # Fit m(x0 + c) ~ base_m + h . (c - base), h in the span of the asked changes.
        # In float64: an image's step should not depend on the batch's float rounding.
        diff = ((offsets[live] - base[:, None]) * filled[live, :, None]).double()
        dm = torch.nan_to_num((margins[live] - base_m[:, None]) * filled[live]).double()
        gram = diff @ diff.transpose(1, 2)
        # A small ridge: nearly repeated measurements must not turn float noise into a step.
        ridge = 1e-3 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-6)
        eye = torch.eye(memory, device=dev, dtype=torch.float64)
        w = torch.linalg.solve(gram + ridge[:, None, None] * eye + (~filled[live]).double().diag_embed(),
                               dm[:, :, None])
        h = (diff.transpose(1, 2) @ w).squeeze(2)
        hh = (h * h).sum(1)
        need = aim - base_m.double() + (h * base.double()).sum(1)  # the fitted margin of x0 is base_m - h . base
        usable = torch.isfinite(base_m) & (hh > 1e-12) & (need > 0)
        if not bool(usable.any()):
            continue
        k = live[usable]
        # A trust region: go a share `reach` of the way from the best change to the fitted
        # smallest one (every point between is fitted correct); widen it after a success,
        # narrow it after a failure (on CIFAR-10 the full step fails four times in five).
        goal = (h[usable] * (need[usable] / hh[usable])[:, None]).float()
        step = reach[k, None]
        verdict = ask(k, base[usable] + step * (goal - base[usable]))
        reach[k] = torch.where(verdict.ok, (reach[k] * 2).clamp(max=1.0),
                               torch.where(verdict.asked, reach[k] / 2, reach[k]))
