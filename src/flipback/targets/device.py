"""Which device a run's models use: `auto` picks CUDA when there is one, then Apple's MPS,
then the CPU. Tensors follow the model's device from there on (attacks allocate on it)."""

from __future__ import annotations

import torch

from ..errors import FlipbackError


def resolve_device(name: str | None) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlipbackError(f"unknown device '{name}'", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlipbackError(f"device '{name}' was asked for, but this PyTorch sees no CUDA device",
                            hint="use --device cpu, or install a CUDA build of PyTorch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FlipbackError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FlipbackError("device 'mps' was asked for, but MPS is not available here", hint="use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise FlipbackError(f"device type '{device.type}' is not supported", hint="use auto, cpu, cuda, cuda:N or mps")
    return device
