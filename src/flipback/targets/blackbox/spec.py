"""load_blackbox: a model SPEC string -> a BlackBoxTarget, with whole-run checks before any work."""

from __future__ import annotations

import torch

from ...errors import ModelError
from ..loading import load_model, parse_floats
from .accountant import BlackBoxTarget
from .base import Backend, TargetError
from .callable import CallableBackend, TorchBackend, import_callable
from .oip import OipBackend, is_server_spec


def _floats(v):
    return parse_floats(v) if isinstance(v, str) else (tuple(float(a) for a in v) if v is not None else None)


def load_backend(spec: str, num_classes: int, *, timeout: float = 10.0, retries: int = 3, backoff: float = 0.5,
                 max_batch: int | None = None, mean=None, std=None, input_shape=None,
                 trust_model: bool = False) -> Backend:
    """The backend for SPEC, without accounting (see load_blackbox)."""
    mean, std = _floats(mean), _floats(std)
    if spec.startswith("python:"):
        target = spec[len("python:"):]
        return CallableBackend(import_callable(target), description=spec, mean=mean, std=std,
                               input_shape=input_shape, max_batch=max_batch)
    if is_server_spec(spec):
        return OipBackend(spec, num_classes, timeout=timeout, mean=mean, std=std, max_batch=max_batch,
                          startup_retries=retries, backoff=backoff)
    if spec.lower().endswith(".onnx"):
        from .onnx import OnnxBackend
        return OnnxBackend(spec, num_classes, mean=mean, std=std, max_batch=max_batch,
                           threads=torch.get_num_threads())
    loaded = load_model(spec, num_classes, mean=mean, std=std, trust_model=trust_model)
    return TorchBackend(loaded.module, description=f"model {spec}", input_shape=loaded.input_shape or input_shape,
                        max_batch=max_batch)


def load_blackbox(spec: str, num_classes: int, *, output: str = "scores", budget: int | None = None,
                  per_image_budget: int | None = None, timeout: float = 10.0, retries: int = 3,
                  rate_limit: float | None = None, max_batch: int | None = None, mean=None, std=None,
                  input_shape: tuple[int, int, int] | None = None, backoff: float = 0.5,
                  max_backoff: float = 8.0, max_retry_after: float = 60.0,
                  trust_model: bool = False) -> BlackBoxTarget:
    """Open SPEC as a black box that answers `output` ("scores" or "label").

    SPEC: `python:MODULE:FUNCTION` (or `python:FILE.py:FUNCTION`), `FILE.onnx`,
    `http(s)://HOST:PORT/v2/models/NAME`, or any white-box spec (`ARCH:WEIGHTS`, `FILE.pt`) run
    as a black box. `mean`/`std` normalize on flipback's side for callables, ONNX files and
    servers that expect normalized input; for white-box specs they go to the model as usual.
    `input_shape` (C,H,W), the data set's, is checked against what the target declares (ModelError
    at load when they differ) and tells a callable's input size.

    Whole-run problems raise ModelError here, before any work: unknown spec, server not ready,
    metadata that does not fit (input not an image batch, lossy input type, output size not
    num_classes), scores asked of a label-only target. When the output size is not in the
    metadata and the input shape is known, one uncounted probe on a blank image checks it."""
    backend = load_backend(spec, num_classes, timeout=timeout, retries=retries, backoff=backoff,
                           max_batch=max_batch, mean=mean, std=std, input_shape=input_shape,
                           trust_model=trust_model)
    try:
        target = BlackBoxTarget(backend, num_classes, output=output, budget=budget,
                                per_image_budget=per_image_budget, retries=retries, backoff=backoff,
                                max_backoff=max_backoff, max_retry_after=max_retry_after,
                                rate_limit=rate_limit, max_batch=max_batch, spec=spec)
        known = backend.input_shape
        if input_shape is not None and known is not None and \
                any(k is not None and k != int(w) for k, w in zip(known, input_shape)):
            shown = tuple("any" if k is None else k for k in known)
            raise ModelError(f"{backend.description} takes images of shape {shown} (C,H,W) but the data set's are "
                             f"{tuple(input_shape)}", hint="check that the data set fits the model")
        shape = tuple(input_shape) if input_shape is not None else known
        needs_probe = backend.num_classes is None or backend.returns_scores is None
        if needs_probe and shape is not None and all(d is not None for d in shape) and not backend.remote:
            try:
                target.query(torch.zeros((1, *shape)), counted=False)
            except TargetError as exc:
                raise ModelError(f"{backend.description} fails on a blank {tuple(shape)} image: {exc.message}",
                                 hint=exc.hint) from None
    except BaseException:
        backend.close()
        raise
    return target


def from_callable(fn, num_classes: int, **kwargs) -> BlackBoxTarget:
    """A BlackBoxTarget around a Python callable (numpy NCHW float32 in, scores or labels out).
    kwargs: those of BlackBoxTarget, plus mean, std, input_shape, description."""
    backend_kw = {k: kwargs.pop(k) for k in ("mean", "std", "input_shape", "description") if k in kwargs}
    backend = CallableBackend(fn, max_batch=kwargs.get("max_batch"), **backend_kw)
    return BlackBoxTarget(backend, num_classes, **kwargs)


def from_module(module: torch.nn.Module, num_classes: int, *, input_shape=None, description: str = "the model",
                **kwargs) -> BlackBoxTarget:
    """A BlackBoxTarget around a PyTorch module that takes [0,1] pixels, used only by its outputs."""
    backend = TorchBackend(module, description=description, input_shape=input_shape,
                           max_batch=kwargs.get("max_batch"))
    return BlackBoxTarget(backend, num_classes, **kwargs)


__all__ = ["from_callable", "from_module", "load_backend", "load_blackbox"]
