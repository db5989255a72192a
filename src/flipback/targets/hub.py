"""Models from the hubs, always from local files: `timm:NAME[:WEIGHTS]` and `hf:DIR`.

Nothing is ever downloaded: timm builds the architecture with `pretrained=False` and the weights
come from a local safetensors or state-dict file; Hugging Face models load from a local folder
with `local_files_only=True`. Each model's own eval config gives its input size, resize,
interpolation, crop and normalization (`Preprocess`, applied when decoding into the cache) and,
for Hugging Face, its class names (`id2label`).

timm and transformers are optional (`pip install 'flipback[hub]'` for transformers; timm needs a
torchvision built for the installed torch, see the README), so both are imported here only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..data.classes import is_placeholder
from ..data.preprocess import FILTER_NAMES, Preprocess
from ..errors import ModelError


@dataclass
class HubInput:
    """What a hub model says about its input, read before its weights are loaded."""

    preprocess: Preprocess
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None
    num_classes: int | None


# ---------------------------------------------------------------- Hugging Face


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError("hf: models need the transformers package",
                         hint="pip install 'flipback[hub]'") from None
    return transformers


def _hf_dir(directory: str) -> Path:
    p = Path(directory).expanduser()
    if not (p / "config.json").is_file():
        raise ModelError(f"hf:{directory}: no config.json in that folder",
                         hint="give a local folder saved with save_pretrained (flipback never downloads models)")
    return p


def hf_input(directory: str) -> HubInput:
    """Size, resize, crop and normalization from the folder's preprocessor_config.json (through
    transformers' own image processor, Pillow backend), class names from config.json's id2label."""
    tf = _transformers()
    p = _hf_dir(directory)
    try:  # remote code (auto_map) is refused by transformers itself: trust_remote_code stays off
        config = tf.AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read hf:{directory}/config.json: {type(exc).__name__}: {exc}") from None
    names = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else None
    channels = int(getattr(config, "num_channels", 3))
    if (p / "preprocessor_config.json").is_file():
        try:
            try:  # the Pillow backend: the default one needs torchvision
                proc = tf.AutoImageProcessor.from_pretrained(p, local_files_only=True, backend="pil")
            except TypeError:  # transformers 4: no `backend`
                proc = tf.AutoImageProcessor.from_pretrained(p, local_files_only=True, use_fast=False)
        except Exception as exc:
            raise ModelError(f"cannot read hf:{directory}/preprocessor_config.json: {type(exc).__name__}: {exc}") from None
        d = proc.to_dict()
    else:  # no processor config: the model's own image_size, no crop, ImageNet-style [-1, 1]
        warnings.warn(f"hf:{directory} has no preprocessor_config.json: resizing to the model's image_size, "
                      "normalizing with mean 0.5, std 0.5")
        size = int(getattr(config, "image_size", 224))
        d = {"size": {"height": size, "width": size}, "image_mean": [0.5] * channels, "image_std": [0.5] * channels}
    pre, mean, std = _hf_preprocess(d, channels, directory)
    return HubInput(pre, mean, std, None if names is None or is_placeholder(names) else names, config.num_labels)


def _pair(size) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    return None


def _hf_preprocess(d: dict, channels: int, directory: str):
    size = d.get("size") or {}
    if isinstance(size, dict):
        size = {k: v for k, v in size.items() if v is not None}
    interp = FILTER_NAMES.get(int(d.get("resample") or 2), "bilinear")
    crop = _pair(d.get("crop_size")) if d.get("do_center_crop") else None
    exact = _pair(size)
    if exact is not None:  # resize to exactly height x width (ViT, DeiT, BEiT ...), then maybe crop
        resize: int | tuple[int, int] = exact
        out = crop or exact
    elif isinstance(size, dict) and size.get("shortest_edge"):
        edge = int(size["shortest_edge"])
        if d.get("crop_pct") and edge < 384:  # ConvNeXt's recipe: scale up by 1/crop_pct, crop edge x edge
            resize, out = int(edge / float(d["crop_pct"])), crop or (edge, edge)
        elif d.get("crop_pct"):  # ConvNeXt at 384 and up: straight to edge x edge, no crop
            resize, out = (edge, edge), (edge, edge)
        else:
            resize, out = edge, crop or (edge, edge)
    else:
        raise ModelError(f"hf:{directory}: cannot read the image size from preprocessor_config.json ({size!r})")
    pre = Preprocess(out[0], out[1], resize, interp, channels)
    # The processor computes (pixel * rescale_factor - mean) / std; flipback's [0,1] pixels are
    # pixel / 255, so fold rescale_factor * 255 into mean and std.
    scale = float(d.get("rescale_factor", 1 / 255)) * 255 if d.get("do_rescale", True) else 255.0
    if d.get("do_normalize", True):
        mean = tuple(float(m) / scale for m in d.get("image_mean", [0.5] * channels))
        std = tuple(float(s) / scale for s in d.get("image_std", [0.5] * channels))
    else:
        mean, std = (0.0,) * channels, (1 / scale,) * channels
    return pre, mean, std


class Logits(nn.Module):
    """A Hugging Face classifier as a module that returns the logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_hf(directory: str, num_classes: int):
    """(module returning logits on normalized input, HubInput)."""
    tf = _transformers()
    info = hf_input(directory)
    if info.num_classes != num_classes:
        raise ModelError(f"hf:{directory} has {info.num_classes} classes, the data set {num_classes}",
                         hint="folders named by the model's labels (id2label) map to its classes; "
                              "or give its class names with --classes FILE")
    try:
        model = tf.AutoModelForImageClassification.from_pretrained(
            _hf_dir(directory), local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for a bad folder
        raise ModelError(f"cannot load hf:{directory}: {type(exc).__name__}: {exc}") from None
    return Logits(model.eval()), info


# ---------------------------------------------------------------- timm


def _timm():
    try:
        import timm
        import timm.data
    except Exception as exc:  # ImportError without torchvision; RuntimeError with a mismatched one
        raise ModelError(
            f"timm: models need the timm package, which cannot be imported here ({type(exc).__name__}: {exc})",
            hint="timm imports torchvision at start-up: install timm with a torchvision built for this torch "
                 "(PyPI's torchvision does not load with the CPU build torch==2.13.0+cpu that flipback pins); "
                 "or export the model to a .pt2 or TorchScript file where timm works") from None
    return timm


def _timm_model(name: str, num_classes: int | None = None) -> nn.Module:
    timm = _timm()
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)  # never downloads
    except RuntimeError as exc:  # timm's "Unknown model (...)"
        raise ModelError(f"timm:{name}: {exc}", hint="list the names with timm.list_models()") from None


def timm_input(name: str, model: nn.Module | None = None) -> HubInput:
    """Input size, interpolation, crop and normalization from timm's pretrained config."""
    timm = _timm()
    model = model if model is not None else _timm_model(name)
    cfg = timm.data.resolve_data_config({}, model=model)
    c, h, w = (int(v) for v in cfg["input_size"])
    pre = Preprocess.for_size(h, w, crop_pct=float(cfg.get("crop_pct") or 1.0),
                              interpolation=cfg.get("interpolation") or "bilinear",
                              squash=cfg.get("crop_mode") == "squash", channels=c)
    return HubInput(pre, tuple(cfg["mean"]), tuple(cfg["std"]), None, getattr(model, "num_classes", None))


def load_timm(name: str, weights: Path | None, num_classes: int, *, trust_model: bool = False):
    """(module on normalized input, HubInput): the architecture from timm, the weights from a
    local .safetensors or state-dict file (None: random weights, with a warning)."""
    from .loading import _state_dict, load_checkpoint

    model = _timm_model(name, num_classes)
    if weights is None:
        warnings.warn(f"timm:{name} has no weights file: its weights are random")
    else:
        if not weights.is_file():
            raise ModelError(f"model file not found: {weights}")
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(weights))
        else:
            sd = _state_dict(load_checkpoint(weights, trust_model=trust_model))
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise ModelError(f"{weights} does not match timm:{name} with {num_classes} classes: {first}",
                             hint="check the model name and that the data set has the model's classes") from None
    return model.eval(), timm_input(name, model)
