"""adv-lib's minimum-norm L2 attacks, the strongest by AttackBench's ranking, as anchors for
flipback's white-box `minimal` (benchmarks/whitebox_minimal.py --advlib ...).

An optional *benchmark* dependency only; flipback itself never imports adv-lib.

Install: ``.venv/bin/pip install --no-deps adv-lib==0.2.8`` (``make test`` and
benchmarks/whitebox.sh do it). ``--no-deps`` because adv-lib 0.2.8 declares visdom and
torchvision: visdom 0.2.4 ships only an sdist whose setup.py needs ``pkg_resources``, which
current setuptools no longer has, so it does not build; and PyPI's torchvision does not load
beside the CPU torch of .venv (see the Makefile). Neither is used by the attacks here: adv-lib
imports visdom for its optional plotting callback and torchvision for LPIPS's AlexNet (an
ALMA distance we do not ask for). ``import_adv_lib`` puts inert placeholders for the two
module names in place, only when they are absent, and any use of them raises.

Settings are AttackBench's (``attack_evaluation/attacks/adv_lib/configs.py``), each attack
targeted at the true label (``targeted=True, labels=truth``) on images already misclassified:
- ``alma``: ALMA, L2, 1,000 steps, α 0.9, initial learning-rate distance 0.1.
- ``fmn``: the original FMN, L2, 1,000 steps, initial step 1, γ 0.05.
- ``ddn``: DDN, 1,000 steps, γ 0.05, initial norm 1, in float (``levels=None``, AttackBench's
  ``ddn_NQ``).
- ``ddn-q``: the same DDN quantizing its change to 256 levels at every step, as the DDN paper
  does: its outputs are 8-bit images already (AttackBench's ``ddn`` uses 255 levels, a grid of
  1/254 that is not the 8-bit one).
- ``apgd-min``: APGD (L2, DLR loss, 100 iterations, ρ 0.75) inside AttackBench's minimum-norm
  search: ε starts at 1, doubles until a success, then bisects, 20 APGD runs per image.
  (AttackBench's "APGD-T" attacks the top-9 classes in turn, an untargeted attack; aimed at
  one class, the true one, plain APGD with a targeted loss is its counterpart.)

Each float output is then judged as flipback judges its own (``judge_batch``): in float,
rounded to the 8-bit grid, and by scale-then-round.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import types
from functools import partial

import torch

from foolbox_baselines import _device_of, judge_batch

__all__ = ["ATTACKS", "GRADIENTS", "import_adv_lib", "minimal_eps_search", "run_advlib"]

ATTACKS = ("alma", "apgd-min", "fmn", "ddn", "ddn-q")
SEARCH_STEPS = 20  # AttackBench's minimal_search_steps
# Gradient evaluations per image each attack spends at its default steps (its "queries").
GRADIENTS = {"alma": 1000, "fmn": 1000, "ddn": 1000, "ddn-q": 1000, "apgd-min": 100 * SEARCH_STEPS}


class _Absent(types.ModuleType):
    """A module that is not there: its names can be imported, and any use of one raises."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__}: a placeholder (benchmarks/advlib_baselines.py); the benchmark "
                           "does not use adv-lib's visdom callbacks or LPIPS")


def import_adv_lib():
    """adv_lib.attacks, with placeholders for the visdom and torchvision it imports but we never use.
    The placeholders are in sys.modules only while adv-lib is imported: left there, they would
    tell other libraries in the process (transformers, timm) that torchvision is installed."""
    placed = [name for name in ("visdom", "torchvision")
              if name not in sys.modules and importlib.util.find_spec(name) is None]
    for name in placed:
        sys.modules[name] = _Absent(name)
    try:
        import adv_lib.attacks
    finally:
        for name in placed:
            sys.modules.pop(name, None)
    return adv_lib.attacks


def minimal_eps_search(attack, model, x: torch.Tensor, y: torch.Tensor, *, init_eps: float = 1.0,
                       steps: int = SEARCH_STEPS) -> torch.Tensor:
    """AttackBench's minimum-norm wrapper for a fixed-ε attack, targeted at y: per image, ε
    doubles from init_eps until the attack succeeds, then bisects; keeps the success of the
    smallest ε. Images never corrected come back unchanged."""
    best = x.clone()
    low = torch.zeros(len(x), device=x.device)
    high = torch.full_like(low, math.inf)
    eps = torch.full_like(low, init_eps)
    for _ in range(steps):
        adv = attack(model=model, inputs=x, labels=y, targeted=True, eps=eps)
        with torch.no_grad():
            ok = model(adv).argmax(1) == y
        better = ok & (eps < high)
        best[better] = adv[better]
        low = torch.where(better, low, eps)
        high = torch.where(better, eps, high)
        eps = torch.where(torch.isfinite(high), (low + high) / 2, 2 * low)
    return best


def make_attack(name: str, steps: int | None = None):
    """A callable (model, x, y) -> float adversarials targeted at y, with AttackBench's settings."""
    a = import_adv_lib()
    if name == "alma":
        f = partial(a.alma, distance="l2", num_steps=steps or 1000, α=0.9, init_lr_distance=0.1)
    elif name == "fmn":
        f = partial(a.fmn, norm=2, steps=steps or 1000, α_init=1.0, γ_init=0.05)
    elif name in ("ddn", "ddn-q"):
        f = partial(a.ddn, steps=steps or 1000, γ=0.05, init_norm=1.0, levels=256 if name == "ddn-q" else None)
    elif name == "apgd-min":
        apgd = partial(a.apgd, norm=2, n_iter=steps or 100, n_restarts=1, loss_function="dlr", rho=0.75,
                       use_large_reps=False, use_rs=True)
        return lambda model, x, y: minimal_eps_search(apgd, model, x, y)
    else:
        raise ValueError(f"unknown adv-lib attack {name!r}; expected one of {ATTACKS}")
    return lambda model, x, y: f(model=model, inputs=x, labels=y, targeted=True)


def run_advlib(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: str, *,
               steps: int | None = None, batch_size: int = 256, seed: int = 0) -> dict:
    """Run one adv-lib attack targeted at ``labels`` (the TRUE labels) on [0, 1] images; ``model``
    takes [0, 1] pixels (normalization inside) and is in eval mode. Returns the same per-image
    tensors and timings as ``foolbox_baselines.run_foolbox``."""
    run = make_attack(attack, steps)
    device = _device_of(model)
    torch.manual_seed(seed)  # APGD's random start
    parts: dict[str, list[torch.Tensor]] = {}
    seconds = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device=device, dtype=torch.float32).contiguous()
        y = labels[start:start + batch_size].to(device=device, dtype=torch.long)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        adv = run(model, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        batch, _ = judge_batch(model, x, adv.detach(), y)
        for k, v in batch.items():
            parts.setdefault(k, []).append(v.cpu())
    out = {k: torch.cat(v) for k, v in parts.items()}
    n = len(images)
    per_image = GRADIENTS[attack] if steps is None else (steps * SEARCH_STEPS if attack == "apgd-min" else steps)
    out.update(attack=attack, n_images=n, seconds=seconds, gradients_per_image=per_image,
               images_per_second=n / seconds if seconds > 0 else math.nan)
    return out
