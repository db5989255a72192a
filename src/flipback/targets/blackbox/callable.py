"""In-process black boxes: a Python callable, or a PyTorch model of which only outputs are used."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ...errors import ModelError
from .base import Backend, BackendFailure, normalizer


class CallableBackend(Backend):
    """`fn(x)` with x a float32 NCHW **numpy** array in [0,1] (a fresh C-contiguous copy, or the
    normalized values when mean/std are given), returning (N, K) scores or (N,) integer labels
    as a numpy array, a torch tensor or a nested list.

    Exceptions from fn: TimeoutError and ConnectionError (a callable that wraps a remote API) are
    retried like a server's; ConnectionRefusedError is not counted. Any other exception fails
    the call with TargetError."""

    def __init__(self, fn: Callable, *, description: str = "the callable", mean=None, std=None,
                 input_shape=None, max_batch: int | None = None):
        if not callable(fn):
            raise ModelError(f"{description} is not callable")
        self.fn = fn
        self.description = description
        self._norm = normalizer(mean, std)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.max_batch = max_batch

    def infer(self, x: np.ndarray) -> np.ndarray:
        arg = self._norm(x) if self._norm else x.copy()
        try:
            out = self.fn(arg)
        except ConnectionRefusedError as exc:
            raise BackendFailure(f"{self.description}: connection refused ({exc})", evaluated=False,
                                 retryable=True) from None
        except (TimeoutError, ConnectionError) as exc:
            raise BackendFailure(f"{self.description}: {type(exc).__name__}: {exc}", evaluated=True,
                                 retryable=True) from None
        except Exception as exc:
            raise BackendFailure(f"{self.description} raised {type(exc).__name__}: {exc}", evaluated=True,
                                 retryable=False) from None
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        return out


class TorchBackend(Backend):
    """A PyTorch module that takes [0,1] NCHW pixels (normalization inside), used only through
    its outputs: this is how a white-box SPEC runs as a black box."""

    def __init__(self, module: nn.Module, *, description: str = "the model", input_shape=None,
                 num_classes: int | None = None, max_batch: int | None = None):
        self.module = module.eval()
        self.description = description
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = num_classes
        self.returns_scores = True
        self.max_batch = max_batch

    @torch.inference_mode()
    def infer(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.module(torch.from_numpy(x))
        except RuntimeError as exc:  # shape mismatch inside the model and the like
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.description} fails on these images: {first}",
                             hint="check that the data set fits the model") from None
        return out.float().numpy()


def import_callable(target: str) -> Callable:
    """'MODULE:FUNCTION' (dotted module, or a path to a .py file; FUNCTION may be dotted) -> callable.
    The current directory is importable, as with `python -m`."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"cannot read 'python:{target}'",
                         hint="use python:MODULE:FUNCTION, e.g. python:mymodel:predict")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ModelError(f"Python file not found: {path}")
            spec = importlib.util.spec_from_file_location(f"flipback_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot import '{module_name}': {type(exc).__name__}: {exc}",
                         hint="the module must be importable from the current directory or PYTHONPATH") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"'{module_name}' has no '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"python:{target} is not callable")
    return obj
