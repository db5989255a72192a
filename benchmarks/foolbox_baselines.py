"""Foolbox 3 baselines for the white-box benchmark (DDN, FMN, fixed FMN).

An optional *benchmark* dependency only (``pip install -e .[bench]``, i.e.
``foolbox==3.3.4``); flipback itself never imports foolbox. Import this module as
``benchmarks.foolbox_baselines`` from the repository root, or put ``benchmarks/`` on
``sys.path`` and import ``foolbox_baselines``.

Every attack is run *targeted at the true label* (``TargetedMisclassification(labels)``)
in minimal-norm mode (``epsilons=None``) on images that are already misclassified, and
its float output is then judged the way the mission defines success: as an 8-bit image.

Install
-------
``.venv/bin/pip install foolbox==3.3.4`` installs foolbox 3.3.4 with eagerpy 0.30.0,
GitPython, requests (and their small dependencies). It leaves torch (2.13.0+cpu), numpy
(2.4.6) and scipy (1.17.1) untouched, and imports and runs with them as is: no
workaround was needed.

The L2 FMN projection bug (confirmed)
-------------------------------------
``foolbox/attacks/fast_minimum_norm.py`` (foolbox 3.3.4), ``L2FMNAttack.project``,
lines 395-400::

    def project(self, x, x0, epsilon):
        norms = flatten(x).norms.l2(axis=-1)        # 396: norm of x, not of x - x0
        norms = ep.maximum(norms, 1e-12)
        factor = ep.minimum(1, norms / norms)       # 398: always exactly 1
        factor = atleast_kd(factor, x.ndim)
        return x0 + (x - x0) * factor               # 400: returns x unchanged

``norms / norms`` is 1 for every image, so ``factor`` is 1 and the method returns
``x0 + (x - x0) = x``: the projection is a no-op (up to float rounding), and
``epsilon`` is never read. (Line 396 is also wrong on its own terms: it takes the norm
of the image ``x``, not of the perturbation ``x - x0``.) The attack's loop
(``FMNAttackLp.run``, line 279: ``delta = self.project(x=x + delta, x0=x,
epsilon=epsilon) - x``) carefully adapts ``epsilon`` (shrinking it by ``1 - gamma``
when adversarial, growing it otherwise), but that radius never constrains ``delta``:
L2 FMN in 3.3.4 degenerates into normalized-gradient steps with a cosine-annealed step
size, whose minimality comes only from keeping the smallest adversarial ``delta`` seen.
What it should do (as in the FMN paper and the authors' reference code) is project
``delta`` onto the L2 ball of radius ``epsilon``:
``delta * min(1, epsilon / ||delta||_2)``. ``L2FMNFixed`` below overrides only
``project`` to do that. (``epsilon`` starts at +inf, giving factor 1, as intended.)

Effect (64 misclassified CIFAR-10 JPEG test images, ResNet-20, 100 steps): stock
``fmn`` succeeds in float on all images but with median L2 ~1.0 (its first step of size
``max_stepsize=1`` is never shrunk); ``fmn-fixed`` reaches median L2 ~0.024 (DDN:
~0.024) but fails on 2/64 near-boundary images, even with 300 steps. The cause is
FMN's own epsilon rule, not this fix: before the first success it sets ``epsilon =
||delta|| + |margin| / ||grad||``, projects, and only *then* clips to [0, 1]; on images
with saturated pixels the clip removes part of the step, the clipped point is still
not adversarial, and epsilon settles at a fixed point that never grows.

Scale-then-round baseline
-------------------------
For each image, the smallest factor ``s >= 1`` such that
``round(clip(x + s * (x_adv - x), 0, 1) * 255) / 255`` is classified as the label,
found with one check at ``s = 1``, doubling ``s = 2, 4, ..., scale_max`` to the first
success, then ``scale_bisect_steps`` geometric bisection steps between the last failing
and first succeeding power of two (defaults: 1 + 6 + 5 = 12 batched forward passes,
final ``s`` within a factor 2**(1/32) ~ 1.022 above the boundary found). The search
runs for every image, also where the float attack failed (its ``delta`` may still point
the right way); the boundary is not guaranteed to be monotone, so this finds the first
working power of two and a local boundary below it, not a global minimum.
"""

from __future__ import annotations

import math
import time

import torch

import eagerpy as ep
import foolbox
from foolbox.attacks.fast_minimum_norm import L2FMNAttack
from foolbox.devutils import atleast_kd, flatten

__all__ = ["ATTACKS", "L2FMNFixed", "judge_batch", "make_attack", "run_foolbox", "scale_then_round",
           "to_uint8_grid"]

ATTACKS = ("ddn", "fmn", "fmn-fixed")


class L2FMNFixed(L2FMNAttack):
    """foolbox 3.3.4 ``L2FMNAttack`` with a correct L2 projection (see module docstring)."""

    def project(self, x: ep.Tensor, x0: ep.Tensor, epsilon: ep.Tensor) -> ep.Tensor:
        delta = x - x0
        norms = ep.maximum(flatten(delta).norms.l2(axis=-1), 1e-12)
        factor = ep.minimum(1, epsilon / norms)
        return x0 + delta * atleast_kd(factor, x.ndim)


def make_attack(attack: str, steps: int = 100):
    if attack == "ddn":
        return foolbox.attacks.DDNAttack(steps=steps)
    if attack == "fmn":
        return foolbox.attacks.L2FMNAttack(steps=steps)
    if attack == "fmn-fixed":
        return L2FMNFixed(steps=steps)
    raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACKS}")


def to_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and round every value to the nearest multiple of 1/255."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def _atleast_kd_t(v: torch.Tensor, k: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (k - v.ndim))


@torch.no_grad()
def _correct(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) == labels


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


@torch.no_grad()
def scale_then_round(model, x, x_adv, labels, *, scale_max: float = 64.0, scale_bisect_steps: int = 5):
    """Smallest s >= 1 (see module docstring) with to_uint8_grid(x + s*(x_adv-x)) classified as label.

    Returns ``(x_scaled, success, scale, n_evals)``; ``scale`` is NaN and ``x_scaled`` is the
    s = 1 rounding where no s <= scale_max worked. All tensors stay on x's device.
    """
    delta = x_adv - x
    n = len(x)

    def at(s: torch.Tensor) -> torch.Tensor:
        return to_uint8_grid(x + _atleast_kd_t(s, x.ndim) * delta)

    one = torch.ones(n, device=x.device, dtype=x.dtype)
    found = _correct(model, at(one), labels)
    hi = torch.where(found, one, torch.full_like(one, math.nan))
    lo = torch.ones_like(one)
    n_evals = 1
    s = 1.0
    while s * 2 <= scale_max and not bool(found.all()):
        s *= 2
        ok = _correct(model, at(torch.full_like(one, s)), labels) & ~found
        hi = torch.where(ok, torch.full_like(one, s), hi)
        lo = torch.where(ok, torch.full_like(one, s / 2), lo)
        found |= ok
        n_evals += 1
    search = found & (hi > 1)
    for _ in range(scale_bisect_steps):
        if not bool(search.any()):
            break
        mid = torch.sqrt(lo * torch.where(search, hi, lo))
        ok = _correct(model, at(mid), labels)
        hi = torch.where(search & ok, mid, hi)
        lo = torch.where(search & ~ok, mid, lo)
        n_evals += 1
    x_scaled = at(torch.where(found, hi, one))
    success = _correct(model, x_scaled, labels)  # a fresh verification of what is returned
    scale = torch.where(success, hi, torch.full_like(hi, math.nan))
    return x_scaled, success, scale, n_evals


def judge_batch(model, x, x_adv, y, *, scale_max: float = 64.0, scale_bisect_steps: int = 5):
    """Judge one batch of an attack's float outputs as flipback judges its own: in float, rounded to
    the 8-bit grid, and by scale-then-round. Returns (per-image tensors, forward passes of the scale
    search). Shared by the Foolbox and adv-lib baselines."""
    x_adv = x_adv.clamp(0, 1)
    ok_float = _correct(model, x_adv, y)
    x_round = to_uint8_grid(x_adv)
    ok_uint8 = _correct(model, x_round, y)
    x_scaled, ok_scaled, scale, n_evals = scale_then_round(
        model, x, x_adv, y, scale_max=scale_max, scale_bisect_steps=scale_bisect_steps)
    nan = torch.full((len(x),), math.nan, device=x.device)
    return {
        "x_adv": x_adv, "success_float": ok_float,
        "x_round": x_round, "success_uint8": ok_uint8,
        "x_scaled": x_scaled, "success_scaled": ok_scaled, "scale": scale,
        "l2_float": torch.where(ok_float, _l2(x_adv, x), nan),
        "l2_uint8": torch.where(ok_uint8, _l2(x_round, x), nan),
        "l2_scaled": torch.where(ok_scaled, _l2(x_scaled, x), nan),
    }, n_evals


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def run_foolbox(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: str,
    *,
    steps: int = 100,
    batch_size: int = 256,
    scale_max: float = 64.0,
    scale_bisect_steps: int = 5,
) -> dict:
    """Run a Foolbox minimal-norm L2 attack targeted at ``labels`` (the TRUE labels).

    ``model`` takes [0, 1] NCHW float pixels and returns logits (normalization inside);
    it should be in eval mode. ``images`` are the misclassified images, ``labels`` their
    true labels. See the module docstring for the attacks and the scale-then-round search.

    Returns a dict of per-image CPU tensors: ``x_adv`` (attack output clipped to [0, 1]),
    ``success_float``, ``success_foolbox`` (foolbox's own verdict), ``x_round`` /
    ``success_uint8`` (``x_adv`` rounded to the 8-bit grid), ``x_scaled`` /
    ``success_scaled`` / ``scale`` (scale-then-round), ``l2_float`` / ``l2_uint8`` /
    ``l2_scaled`` (L2 of the change in [0, 1] units, NaN where not successful); and
    scalars ``seconds`` (wall time of the attack calls only), ``images_per_second``,
    ``attack``, ``steps``, ``n_images``, ``scale_evals`` (batched forward passes of the
    scale search, max over batches).
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACKS}")
    if images.ndim != 4 or labels.shape != (len(images),):
        raise ValueError("expected images N,C,H,W and labels N")
    device = _device_of(model)
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=device)
    fb_attack = make_attack(attack, steps)

    keys = ("x_adv", "success_float", "success_foolbox", "x_round", "success_uint8",
            "x_scaled", "success_scaled", "scale", "l2_float", "l2_uint8", "l2_scaled")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    seconds = 0.0
    scale_evals = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device=device, dtype=torch.float32).contiguous()
        y = labels[start:start + batch_size].to(device=device, dtype=torch.long)
        criterion = foolbox.criteria.TargetedMisclassification(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        raw, _clipped, fb_success = fb_attack(fmodel, x, criterion, epsilons=None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0

        batch, n_evals = judge_batch(model, x, raw.detach(), y, scale_max=scale_max,
                                     scale_bisect_steps=scale_bisect_steps)
        batch["success_foolbox"] = fb_success.detach()
        scale_evals = max(scale_evals, n_evals)
        for k in keys:
            parts[k].append(batch[k].cpu())

    out = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    n = len(images)
    out.update(
        attack=attack, steps=steps, n_images=n, seconds=seconds,
        images_per_second=n / seconds if seconds > 0 else math.nan,
        scale_evals=scale_evals,
    )
    return out
