"""Turn a model SPEC string into a PyTorch module that takes [0,1] pixels.

SPEC forms handled here (white-box): `ARCH:WEIGHTS` for zoo architectures and
`FILE.pt` TorchScript files. Checkpoints load with `weights_only=True`, so a file can
never run pickled code unless the user passes `trust_model=True`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ModelError
from .zoo import ZOO, Normalized

TORCHSCRIPT_SUFFIXES = (".pt", ".torchscript")


@dataclass
class LoadedModel:
    module: nn.Module  # eval mode, takes [0,1] NCHW pixels, returns logits
    spec: str
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int] | None  # C, H, W when known


def parse_floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ModelError(f"cannot read '{text}' as comma-separated numbers", hint="e.g. --mean 0.5,0.5,0.5")


def _state_dict(obj) -> dict:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError("the checkpoint holds no state_dict of tensors")
    # Checkpoints saved from nn.DataParallel carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(path: Path, *, trust_model: bool = False):
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError variants
        if not trust_model:
            raise ModelError(
                f"{path} is not a plain weights file ({type(exc).__name__}); refusing to unpickle it",
                hint="it may run code when loaded; pass --trust-model only if you trust its source",
            ) from None
    warnings.warn(f"loading {path} with full unpickling (--trust-model): it can run arbitrary code")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_zoo_model(arch: str, weights: Path | None, num_classes: int, *, mean=None, std=None,
                   trust_model: bool = False) -> LoadedModel:
    entry = ZOO.get(arch)
    if entry is None:
        raise ModelError(f"unknown architecture '{arch}'", hint=f"known: {', '.join(sorted(ZOO))}")
    net = entry.build(num_classes)
    if weights is not None:
        obj = load_checkpoint(weights, trust_model=trust_model)
        if isinstance(obj, nn.Module):  # a fully pickled model, only reachable with trust_model
            net = obj
        else:
            sd = _state_dict(obj)
            try:
                result = net.load_state_dict(sd, strict=False)
            except RuntimeError as exc:  # shapes differ, e.g. another number of classes
                first = str(exc).strip().splitlines()[-1].strip()
                raise ModelError(f"checkpoint {weights} does not match architecture {arch} with "
                                 f"{num_classes} classes: {first}",
                                 hint="check the architecture and that the data set has the model's classes") from None
            if result.missing_keys or result.unexpected_keys:
                raise ModelError(
                    f"checkpoint {weights} does not match architecture {arch} "
                    f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected keys, "
                    f"e.g. {(result.missing_keys or result.unexpected_keys)[0]})",
                    hint="check the architecture name and depth",
                )
    mean = mean or entry.mean
    std = std or entry.std
    model = Normalized(net, mean, std).eval()
    return LoadedModel(model, f"{arch}:{weights}", arch, num_classes, entry.input_shape)


def load_model(spec: str, num_classes: int, *, mean=None, std=None, trust_model: bool = False) -> LoadedModel:
    """Load a white-box model from SPEC. `num_classes` comes from the data set."""
    arch, sep, weights = spec.partition(":")
    if sep and arch in ZOO:
        if not weights:
            raise ModelError(f"'{spec}' names no weights file", hint=f"use {arch}:PATH")
        return load_zoo_model(arch, Path(weights) if weights else None, num_classes,
                              mean=mean, std=std, trust_model=trust_model)
    if spec.endswith(TORCHSCRIPT_SUFFIXES):
        return _load_torchscript(Path(spec), num_classes, mean, std)
    if sep and re.fullmatch(r"[A-Za-z_]\w*", arch):
        raise ModelError(f"unknown architecture '{arch}'", hint=f"known: {', '.join(sorted(ZOO))}")
    if arch in ZOO:
        raise ModelError(f"'{spec}' names an architecture but no weights", hint=f"use {arch}:PATH")
    raise ModelError(f"cannot understand model spec '{spec}'",
                     hint="use ARCH:WEIGHTS (e.g. cifar_resnet20:model.th) or FILE.pt")


def _load_torchscript(path: Path, num_classes: int, mean, std) -> LoadedModel:
    if not path.is_file():
        raise ModelError(f"TorchScript file not found: {path}")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelError(f"cannot load TorchScript file {path}: {exc}") from None
    net.eval()
    model: nn.Module = Normalized(net, mean, std).eval() if mean and std else net
    return LoadedModel(model, str(path), "torchscript", num_classes, None)
