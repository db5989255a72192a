"""Export a flipback model (normalization inside, [0,1] pixels in, logits out) to ONNX.

    from flipback.targets.export import export_onnx
    export_onnx("cifar_resnet20:cifar10_resnet20.th", "resnet20.onnx", num_classes=10)

The file takes a float32 NCHW input named `images` (batch dimension free by default) and gives
`logits` (N, classes). It is checked with onnxruntime against PyTorch before it is kept.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import ModelError
from .loading import load_model

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(spec_or_module: str | nn.Module, path: str | os.PathLike, input_shape=None,
                dynamic_batch: bool = True, *, num_classes: int | None = None, mean=None, std=None,
                opset: int = 17, atol: float = 1e-4, trust_model: bool = False) -> Path:
    """Write SPEC (`ARCH:WEIGHTS`, `FILE.pt`) or a module taking [0,1] pixels to an ONNX file.

    input_shape: (C,H,W) or (N,C,H,W); defaults to the zoo entry's shape. num_classes is needed
    for a SPEC. After export, onnxruntime and PyTorch must agree within `atol` on random images
    (and on 2 images at once with a free batch), or ModelError is raised and no file is left."""
    if isinstance(spec_or_module, str):
        if num_classes is None:
            raise ModelError("exporting a model SPEC needs its number of classes", hint="pass num_classes")
        loaded = load_model(spec_or_module, num_classes, mean=mean, std=std, trust_model=trust_model)
        module, input_shape = loaded.module, input_shape or loaded.input_shape
        name = spec_or_module
    elif isinstance(spec_or_module, nn.Module):
        module, name = spec_or_module, type(spec_or_module).__name__
    else:
        raise TypeError("export_onnx takes a model SPEC string or an nn.Module")
    if input_shape is None:
        raise ModelError(f"the input shape of {name} is not known", hint="pass input_shape=(C, H, W)")
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 3:
        shape = (2 if dynamic_batch else 1, *shape)
    if len(shape) != 4:
        raise ModelError(f"input_shape must be (C,H,W) or (N,C,H,W), got {input_shape}")
    module = module.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        _export(module, example, tmp, dynamic_batch, opset)
        _verify(module, tmp, shape, dynamic_batch, atol, name)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _export(module: nn.Module, example: torch.Tensor, path: str, dynamic_batch: bool, opset: int) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        # The TorchScript-based exporter: needs no extra package, and handles the zoo's models.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        return
    except Exception as legacy_exc:  # a torch without the legacy exporter: try torch.export's
        first = legacy_exc
    try:
        dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=dims, opset_version=opset, dynamo=True)
    except Exception as exc:
        raise ModelError(f"cannot export the model to ONNX: {type(first).__name__}: {first}; "
                         f"{type(exc).__name__}: {exc}") from None


def _verify(module: nn.Module, path: str, shape, dynamic_batch: bool, atol: float, name: str) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("checking the ONNX export needs onnxruntime", hint="pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    batches = [shape[0]] + ([1, 3] if dynamic_batch else [])
    for n in batches:
        x = torch.rand((n, *shape[1:]), generator=gen)
        with torch.inference_mode():
            ref = module(x).float().numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
        if not diff <= atol:
            raise ModelError(f"the ONNX export of {name} differs from PyTorch by {diff:.3g} (> {atol:g}) "
                             f"on a batch of {n}")
