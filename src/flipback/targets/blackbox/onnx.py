"""An ONNX file run by onnxruntime on the CPU, seen only through its outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ModelError
from .base import LOSSY_INPUT_TYPES, ONNX_TYPES, Backend, BackendFailure, encode_pixels, normalizer, pick_layout


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ModelError("ONNX targets need onnxruntime", hint="pip install onnxruntime") from None
    return onnxruntime


class OnnxBackend(Backend):
    """Input name, layout, datatype and shape come from the model. Float inputs get [0,1]
    pixels (or normalized ones when mean/std are given); uint8 inputs get 0..255 and only
    8-bit candidates. The output is the one with `num_classes` values per image (or the only one)."""

    def __init__(self, path: str | Path, num_classes: int, *, mean=None, std=None, threads: int | None = None,
                 max_batch: int | None = None):
        ort = _ort()
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"ONNX file not found: {path}")
        self.description = f"ONNX model {path.name}"
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load ONNX file {path}: {first}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{self.description} has {len(inputs)} inputs; flipback needs one image input")
        inp = inputs[0]
        if inp.type in LOSSY_INPUT_TYPES:
            raise ModelError(f"{self.description} takes {inp.type} inputs, which cannot hold 8-bit pixel values "
                             "exactly", hint="export the model with float32 or uint8 input")
        if inp.type not in ONNX_TYPES:
            raise ModelError(f"{self.description} takes {inp.type} inputs", hint="export with float32 or uint8 input")
        self.input_name = inp.name
        self.datatype = ONNX_TYPES[inp.type]
        self.layout, self.input_shape = pick_layout(inp.shape, self.description)
        if self.input_shape == (None, None, None):
            self.input_shape = None
        batch = inp.shape[0]
        self.max_batch = batch if isinstance(batch, int) and batch > 0 else None
        if max_batch:
            self.max_batch = min(max_batch, self.max_batch or max_batch)
        if self.datatype == "UINT8" and (mean is not None or std is not None):
            raise ModelError(f"{self.description} takes uint8 pixels; it cannot take a mean/std normalization")
        self._norm = normalizer(mean, std)
        self.output_name, self.num_classes, self.returns_scores = _pick_output(
            [(o.name, o.type, o.shape) for o in self.session.get_outputs()], num_classes, self.description)

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self._norm:
            x = self._norm(x)
        feed = encode_pixels(x, self.datatype, self.layout)
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: feed})
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendFailure(f"{self.description} failed: {first}", evaluated=True, retryable=False) from None
        return out


def _pick_output(outputs, num_classes: int, description: str):
    """(name, num_classes or None, returns_scores) for outputs given as (name, type, shape)."""
    def kind(t: str):
        t = t.lower()
        if any(k in t for k in ("float", "double", "fp")):
            return "scores"
        if "int" in t:
            return "label"
        return None

    def size(shape):
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
            return shape[1]
        return None

    usable = [(n, kind(t), s) for n, t, s in outputs if kind(t) is not None]
    if len(usable) == 1:
        name, k, shape = usable[0]
    else:
        exact = [u for u in usable if u[1] == "scores" and size(u[2]) == num_classes]
        if len(exact) != 1:
            names = ", ".join(n for n, _, _ in outputs)
            raise ModelError(f"{description} has outputs {names}; cannot tell which holds the class scores",
                             hint="name the output (for a server: ?output=NAME after the model URL)")
        name, k, shape = exact[0]
    if k == "label":
        ok = len(shape) == 1 or (len(shape) == 2 and (not isinstance(shape[1], int) or shape[1] in (1, -1)))
        if not ok:
            raise ModelError(f"{description} output '{name}' has integer values of shape {list(shape)}; "
                             "flipback needs scores (N, classes) or labels (N,)")
        return name, None, False
    if len(shape) != 2:
        raise ModelError(f"{description} output '{name}' has shape {list(shape)}; flipback needs (N, classes)")
    k_out = size(shape)
    if k_out is not None and k_out != num_classes:
        raise ModelError(f"{description} returns {k_out} scores per image but the data set has {num_classes} classes",
                         hint="check that the model was trained on these classes")
    return name, k_out, True
