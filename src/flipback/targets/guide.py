"""Guides: where an attack's gradients come from.

A guide is a differentiable model that takes [0,1] NCHW pixels. In white-box mode it is the
target itself, and every evaluation of a modified image is a counted query (`free` is False;
`WhiteBoxTarget` is both oracle and guide). In black-box mode it is the surrogate, which is
flipback's own model, so evaluating it costs no target query (`free` is True).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn as nn

from ..errors import ModelError

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# On the CPU, convolutions at ImageNet sizes run much faster in channels-last layout: measured
# side by side on EfficientNet-Lite0 at 224 px on 2 cores, a forward pass 9.4 -> 18.4 images/s,
# a forward and backward pass 2.8 -> 6.2 (64 images). At 28-32 px it is not worth a copy.
# Images at least this many pixels a side go through in that layout (the module's 4-D weights
# converted once, in place); gradients come back contiguous. Logits differ from
# the plain layout by float rounding only (1e-5 on Lite0's logits; MIN_MARGIN is 1e-4).
CHANNELS_LAST_MIN = 64


def channels_last_pays(x: torch.Tensor) -> bool:
    """True for CPU image batches at least CHANNELS_LAST_MIN pixels a side."""
    return x.ndim == 4 and x.device.type == "cpu" and min(x.shape[2:]) >= CHANNELS_LAST_MIN


def to_channels_last(module: nn.Module) -> bool:
    """Converts the module's 4-D weights to channels-last in place; False if it cannot."""
    try:
        module.to(memory_format=torch.channels_last)
        return True
    except Exception:  # a module that cannot convert keeps the plain layout
        return False


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logit of the true class minus the strongest other class: > 0 exactly when correct."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(1).values


def smooth_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logit of the true class minus the log-sum-exp of the others: a lower bound of
    `margin` that sees every competing class, so one step moves away from all of them."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - torch.logsumexp(others, 1)


def neg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -nn.functional.cross_entropy(logits, labels, reduction="none")


class ModelGuide:
    """Logits and input gradients of a module. Safe to share between threads: it holds no
    state that a call changes (the parameters are frozen).

    The module is used in place, not copied (a copy of a large model would double its
    memory): it is moved to `device`, put in eval mode, its parameters stop requiring
    gradients, and on the CPU with images CHANNELS_LAST_MIN pixels a side or more its 4-D
    weights are converted to channels-last. Pass `copy.deepcopy(module)` to keep yours as
    it was."""

    free = True

    def __init__(self, module: nn.Module, num_classes: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_classes = num_classes
        self._channels_last: bool | None = None  # decided at the first large CPU batch
        self._layout_lock = threading.Lock()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """x in channels-last layout where that pays (see CHANNELS_LAST_MIN), else x."""
        if not channels_last_pays(x):
            return x
        if self._channels_last is None:
            with self._layout_lock:
                if self._channels_last is None:
                    self._channels_last = to_channels_last(self.module)
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.module(self._layout(x))
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ModelError(
                f"the model returns {tuple(logits.shape[1:])} outputs per image but the data set has "
                f"{self.num_classes} classes",
                hint="check that the model was trained on these classes",
            )
        return logits

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x.to(self.device)).float()

    def gradients(self, x: torch.Tensor, labels: torch.Tensor, objective: Objective = margin,
                  need_grad: torch.Tensor | None = None):
        """Logits and d objective / d x per image. `need_grad` masks images whose gradient is
        not wanted; their rows are zero."""
        x = x.to(self.device).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._forward(x)
            value = objective(logits, labels.to(self.device))
            if need_grad is not None:
                value = value * need_grad.to(value.device, value.dtype)
            if need_grad is None or bool(need_grad.any()):
                (grad,) = torch.autograd.grad(value.sum(), x)
            else:
                grad = torch.zeros_like(x)
        # contiguous(): after a channels-last forward (`_layout`) autograd returns that layout.
        return logits.detach().float(), grad.detach().contiguous()
