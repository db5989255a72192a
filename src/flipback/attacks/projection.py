"""The smallest L2 change that reaches a linearized decision boundary, on the 8-bit grid.

Problem, per image: minimise ||k||_2 over integer steps k (units of 1/255) such that
g . k >= c and the image stays in [0, 255]. Taking unit steps by decreasing gain/cost
ratio |g_i| / (2|k_i| + 1) is optimal up to one step, and it has a closed form: for a
threshold t, coordinate i takes floor(|g_i| / 2t + 1/2) steps (capped by its room). So the
solution is "scale the gradient, then round", with the scale found by bisection on t.
In float mode the rounding is dropped and this is the exact box-constrained projection.

Everything is batched: one bisection runs for all images at once.
"""

from __future__ import annotations

import torch

_BISECTION_STEPS = 40


def _steps(a: torch.Tensor, room: torch.Tensor, t: torch.Tensor, discrete: bool) -> torch.Tensor:
    s = a / (2 * t[:, None])
    if discrete:
        s = torch.floor(s + 0.5)
    return torch.minimum(s, room)


def project_to_halfspace(grad: torch.Tensor, need: torch.Tensor, pixels255: torch.Tensor,
                         *, discrete: bool = True) -> torch.Tensor:
    """Smallest change (in 1/255 units) with grad . change >= need.

    grad: (B, n) gradient of the objective with respect to pixel values in 1/255 units.
    need: (B,) required increase of the objective (<= 0 means no change is needed).
    pixels255: (B, n) current pixel values in [0, 255], bounding the change.
    Returns (B, n) changes; integers when `discrete`. Where the linear model says even the
    largest change in the box cannot reach `need`, the largest change is returned.
    """
    a = grad.abs()
    room = torch.where(grad > 0, 255.0 - pixels255, pixels255).clamp_min(0)
    room = torch.where(a > 0, room, torch.zeros_like(room))
    amax = a.max(1).values.clamp_min(1e-30)
    # Bisection in log-space on t: gain(t) decreases with t.
    lo = torch.log(amax * 1e-9)  # gain(lo) is (about) the whole box
    hi = torch.log(amax * 1e9)  # gain(hi) is (about) nothing
    target = need.clamp_min(0)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        gain = (a * _steps(a, room, torch.exp(mid), discrete)).sum(1)
        ok = gain >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    steps = _steps(a, room, torch.exp(lo), discrete)
    if discrete:
        steps = _drop_surplus(a, steps, target)
    steps = torch.where((need > 0)[:, None], steps, torch.zeros_like(steps))
    return steps * torch.sign(grad)


def _drop_surplus(a: torch.Tensor, steps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Take back last unit steps, worst gain/cost first, while the gain stays >= target.

    With tied gradients, one threshold moves every tied coordinate at once; this keeps
    only as many of them as the target needs."""
    surplus = (a * steps).sum(1) - target
    ratio = torch.where(steps > 0, a / (2 * steps - 1).clamp_min(1), torch.full_like(a, float("inf")))
    order = ratio.argsort(1)
    gains = torch.where(steps > 0, a, torch.zeros_like(a)).gather(1, order)
    removable = gains.cumsum(1) <= surplus[:, None]
    drop = torch.zeros_like(steps).scatter(1, order, removable.to(steps.dtype))
    return steps - drop
