"""Turn a model SPEC string into a PyTorch module that takes [0,1] pixels.

SPEC forms handled here (white-box): `ARCH:WEIGHTS` for zoo architectures, `FILE.pt`
TorchScript files, `FILE.pt2` torch.export archives, `timm:NAME[:WEIGHTS]` and `hf:DIR`
(targets/hub.py, local files only), and `python:MODULE:FACTORY`, a factory returning an
nn.Module (importing it runs the user's code: naming it is the user's explicit act).
Checkpoints load with `weights_only=True`, so a file can never run pickled code unless
the user passes `trust_model=True`.

`model_input(spec)` says, before any weights are loaded, how the data must be prepared for the
model (its eval transform) and which classes it has; `dataset_for_model` loads a data set so.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..data.preprocess import Preprocess
from ..errors import ModelError
from .zoo import ZOO, Normalized

TORCHSCRIPT_SUFFIXES = (".pt", ".torchscript")
EXPORT_SUFFIXES = (".pt2",)


@dataclass
class LoadedModel:
    module: nn.Module  # eval mode, takes [0,1] NCHW pixels, returns logits
    spec: str
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int] | None  # C, H, W when known
    preprocess: Preprocess | None = None  # the eval transform its data is decoded with
    class_names: list[str] | None = None  # the model's own labels (Hugging Face id2label)


@dataclass
class ModelInput:
    """How data must be prepared for a model, known before its weights load."""

    preprocess: Preprocess | None = None
    class_names: list[str] | None = None


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
    """Load a white-box model from SPEC. `num_classes` comes from the data set (after its classes
    were matched to the model's: see dataset_for_model)."""
    if spec.startswith("hf:"):
        return _load_hf(spec, num_classes, mean, std)
    if spec.startswith("timm:"):
        return _load_timm(spec, num_classes, mean, std, trust_model)
    if spec.startswith("python:"):
        return _load_factory(spec, num_classes, mean, std)
    if spec.endswith(EXPORT_SUFFIXES):
        return _load_exported(Path(spec), num_classes, mean, std)
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
                     hint="use ARCH:WEIGHTS (e.g. cifar_resnet20:model.th), FILE.pt, FILE.pt2, timm:NAME[:WEIGHTS], "
                          "hf:DIR or python:MODULE:FACTORY")


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


def _normalized(net: nn.Module, mean, std, default_mean=None, default_std=None) -> nn.Module:
    mean, std = mean or default_mean, std or default_std
    return Normalized(net, mean, std).eval() if mean and std else net.eval()


def _load_hf(spec: str, num_classes: int, mean, std) -> LoadedModel:
    from .hub import load_hf

    net, info = load_hf(spec[len("hf:"):], num_classes)
    p = info.preprocess
    return LoadedModel(_normalized(net, mean, std, info.mean, info.std), spec, "hf", num_classes,
                       (p.channels or 3, p.height, p.width), p, info.class_names)


def _timm_spec(spec: str) -> tuple[str, Path | None]:
    name, _, weights = spec[len("timm:"):].partition(":")
    if not name:
        raise ModelError(f"'{spec}' names no timm model", hint="use timm:NAME[:WEIGHTS], e.g. timm:resnet18:r18.safetensors")
    return name, Path(weights) if weights else None


def _load_timm(spec: str, num_classes: int, mean, std, trust_model: bool) -> LoadedModel:
    from .hub import load_timm

    name, weights = _timm_spec(spec)
    net, info = load_timm(name, weights, num_classes, trust_model=trust_model)
    p = info.preprocess
    return LoadedModel(_normalized(net, mean, std, info.mean, info.std), spec, f"timm:{name}", num_classes,
                       (p.channels or 3, p.height, p.width), p, None)


def _load_factory(spec: str, num_classes: int, mean, std) -> LoadedModel:
    """`python:MODULE:FACTORY`: FACTORY() returns an nn.Module taking [0,1] pixels (or, with
    --mean/--std, normalized ones). Importing MODULE runs its code, as `python -m` would."""
    from .blackbox.callable import import_callable

    factory = import_callable(spec[len("python:"):])
    try:
        net = factory()
    except Exception as exc:
        raise ModelError(f"{spec} failed: {type(exc).__name__}: {exc}",
                         hint="white-box mode calls FACTORY() for an nn.Module; "
                              "a function on NumPy arrays runs with --mode black-box") from None
    if not isinstance(net, nn.Module):
        raise ModelError(f"{spec} returned {type(net).__name__}, not a torch.nn.Module",
                         hint="white-box mode needs a factory returning an nn.Module; "
                              "a function on NumPy arrays runs with --mode black-box")
    return LoadedModel(_normalized(net, mean, std), spec, "python", num_classes, None)


def _exported_input_shape(program) -> tuple[int, int, int] | None:
    """(C, H, W) of the archive's image input, when static; raises for a fixed batch size."""
    names = program.graph_signature.user_inputs
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            shape = tuple(getattr(val, "shape", ()))
            if len(shape) != 4:
                return None
            if isinstance(shape[0], int):
                raise ModelError(f"the torch.export archive takes a fixed batch of {shape[0]} image(s)",
                                 hint="export with a dynamic batch: dynamic_shapes=({0: torch.export.Dim('batch')},)")
            rest = shape[1:]
            return tuple(int(d) for d in rest) if all(isinstance(d, int) for d in rest) else None
    return None


class _Exported(nn.Module):
    """An archive's module. Its graph was captured in one mode (eval, for a classifier), and
    torch.export's module refuses train()/eval(): keep the calls flipback makes from reaching it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _load_exported(path: Path, num_classes: int, mean, std) -> LoadedModel:
    """A torch.export archive (.pt2): a graph and its weights, no Python code to run."""
    if not path.is_file():
        raise ModelError(f"torch.export archive not found: {path}")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"cannot load torch.export archive {path}: {type(exc).__name__}: {exc}") from None
    shape = _exported_input_shape(program)
    pre = Preprocess.for_size(shape[1], shape[2], channels=shape[0]) if shape else None
    return LoadedModel(_normalized(_Exported(program.module()), mean, std), str(path), "torch.export", num_classes,
                       shape, pre)


def model_input(spec: str) -> ModelInput:
    """The model's eval transform and class names, before its weights load (None where unknown:
    TorchScript files, factories, black boxes)."""
    if spec.startswith(("http://", "https://")):  # a model server: its input is its own business
        return ModelInput()
    if spec.startswith("hf:"):
        from .hub import hf_input

        info = hf_input(spec[len("hf:"):])
        return ModelInput(info.preprocess, info.class_names)
    if spec.startswith("timm:"):
        from .hub import timm_input

        return ModelInput(timm_input(_timm_spec(spec)[0]).preprocess)
    if spec.endswith(EXPORT_SUFFIXES):
        return ModelInput(_load_exported(Path(spec), 0, None, None).preprocess)
    arch, sep, _ = spec.partition(":")
    entry = ZOO.get(arch) if sep else None
    if entry is not None:
        c, h, w = entry.input_shape
        return ModelInput(Preprocess.for_size(h, w, channels=c))
    return ModelInput()


def dataset_for_model(spec: str, data, *, split: str = "test", classes: str | None = None,
                      progress: bool = False, cache_dir=None, workers: int | None = None):
    """The data set at `data`, decoded with the model's eval transform (images of any size and
    aspect ratio come out at its input size), its classes matched to the model's labels: the
    model's own (id2label), those of `classes` (a file, one name a line, in the model's order),
    or ImageNet's 1,000 for folders named by synsets."""
    from ..data import load_dataset
    from ..data.classes import match_classes, read_class_file

    info = model_input(spec)
    names = read_class_file(classes) if classes else info.class_names
    ds = load_dataset(data, split=split, progress=progress, cache_dir=cache_dir, workers=workers,
                      transform=info.preprocess)
    return match_classes(ds, names, source=f"--classes {classes}" if classes else f"the model {spec}")
