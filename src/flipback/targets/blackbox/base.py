"""What every black-box backend shares: answers, errors, and how pixels and outputs are checked.

A backend knows how to evaluate one batch once (`Backend.infer`). It never retries, counts or
waits: `BlackBoxTarget` (accountant.py) does that for every backend, so the rules are the same
for a Python callable, an ONNX file and a model server.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import ModelError
from ..answers import OUTPUTS, Answer, BudgetExceeded, TargetError  # noqa: F401 - re-exported


class BackendFailure(Exception):
    """Internal: one attempt failed. The accountant turns it into a retry, a TargetError or a
    ModelError.

    evaluated: the target may have evaluated the images (so the attempt is counted).
    retryable: a retry may succeed (5xx, 429, timeout, connection error).
    retry_after: seconds the server asked us to wait (Retry-After), if any.
    too_large: the server refused the batch as too large (HTTP 413): split it and resend."""

    def __init__(self, message: str, *, evaluated: bool, retryable: bool, retry_after: float | None = None,
                 too_large: bool = False, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.evaluated = evaluated
        self.retryable = retryable
        self.retry_after = retry_after
        self.too_large = too_large
        self.hint = hint


class Backend:
    """One way of evaluating images. Subclasses set the attributes in __init__ and implement infer.

    infer(x): x is a float32 C-contiguous NCHW numpy array in [0,1] (exactly the values the
    target must see). Returns a numpy array: (N, K) float scores or (N,) integer labels.
    Raises BackendFailure for a failed attempt, ModelError for a whole-run problem."""

    description: str = "target"  # for messages; never holds credentials
    num_classes: int | None = None  # output size when known before any call
    returns_scores: bool | None = None  # None: unknown until the first answer
    input_shape: tuple[int | None, int | None, int | None] | None = None  # C, H, W; None = any
    max_batch: int | None = None  # largest batch the backend accepts, when it says
    default_batch: int = 256  # chunk size when neither the user nor the backend sets one
    remote: bool = False

    def infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- pixels


def normalizer(mean, std):
    """(x - mean) / std per channel, or None. Used for black-box models that expect normalized
    input (flipback's own ONNX exports carry normalization inside and need none)."""
    if mean is None and std is None:
        return None
    if mean is None or std is None or len(mean) != len(std):
        raise ModelError("mean and std must be given together, one value per channel",
                         hint="e.g. --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25")
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    if (s <= 0).any():
        raise ModelError("std values must be positive")

    def apply(x: np.ndarray) -> np.ndarray:
        if x.shape[1] != m.shape[1]:
            raise ModelError(f"mean/std have {m.shape[1]} channels but the images have {x.shape[1]}")
        return np.ascontiguousarray((x - m) / s, dtype=np.float32)

    return apply


def encode_pixels(x: np.ndarray, datatype: str, layout: str = "NCHW") -> np.ndarray:
    """Turn [0,1] float32 NCHW pixels into what a model's input takes, without changing any value
    the model sees: FP32 as is, FP64 widened exactly, UINT8 only for images on the 8-bit grid."""
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if datatype == "FP32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if datatype == "FP64":
        return x.astype(np.float64)
    if datatype == "UINT8":
        scaled = x.astype(np.float64) * 255.0
        rounded = np.rint(scaled)
        if np.abs(scaled - rounded).max(initial=0.0) > 1e-3:
            raise BackendFailure(
                "the target takes 8-bit (UINT8) images but this candidate has values between the "
                "8-bit levels", evaluated=False, retryable=False,
                hint="use 8-bit candidates (--pixels uint8) with this target")
        return rounded.astype(np.uint8)
    raise ModelError(f"input datatype {datatype} is not supported", hint="serve FP32, FP64 or UINT8 inputs")


ONNX_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(uint8)": "UINT8"}
LOSSY_INPUT_TYPES = ("FP16", "BF16", "tensor(float16)", "tensor(bfloat16)")


def pick_layout(shape, what: str) -> tuple[str, tuple[int | None, int | None, int | None]]:
    """Layout and (C, H, W) from a rank-4 input shape whose unknown dims are None or -1."""
    dims = [None if (d is None or not isinstance(d, int) or d < 0) else int(d) for d in shape]
    if len(dims) != 4:
        raise ModelError(f"{what} takes inputs of shape {list(shape)}; flipback needs a batch of images "
                         "(rank 4: N,C,H,W or N,H,W,C)")
    if dims[1] in (1, 3) or dims[3] not in (1, 3):
        return "NCHW", (dims[1], dims[2], dims[3])
    return "NHWC", (dims[3], dims[1], dims[2])


# ----------------------------------------------------------------------------- answers


def check_output(raw, n: int, num_classes: int, *, description: str):
    """Validate one batch's raw output. Returns (labels int64 (N,), scores float32 (N,K) or None).

    Whole-run problems (wrong number of classes) raise ModelError; a bad answer to this call
    (wrong number of rows, NaN/Inf, labels out of range, not numeric) raises BackendFailure."""
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    try:
        arr = np.asarray(raw)
    except Exception as exc:  # ragged lists and the like
        raise BackendFailure(f"{description} returned an answer that is not an array ({exc})",
                             evaluated=True, retryable=False) from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise BackendFailure(f"{description} returned a non-numeric answer (dtype {arr.dtype})",
                             evaluated=True, retryable=False)
    if arr.ndim == 2 and arr.shape[1] == 1 and np.issubdtype(arr.dtype, np.integer):
        arr = arr[:, 0]
    if arr.ndim == 0 or len(arr) != n:
        raise BackendFailure(f"{description} answered {arr.shape[0] if arr.ndim else 0} rows for {n} images",
                             evaluated=True, retryable=False)
    if arr.ndim == 1:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ModelError(f"{description} returns one {arr.dtype} value per image; flipback needs class "
                             "scores (N, classes) or integer labels (N,)")
        labels = arr.astype(np.int64)
        if ((labels < 0) | (labels >= num_classes)).any():
            bad = labels[(labels < 0) | (labels >= num_classes)][0]
            raise BackendFailure(f"{description} answered label {bad}, outside 0..{num_classes - 1}",
                                 evaluated=True, retryable=False)
        return torch.from_numpy(labels.copy()), None
    if arr.ndim != 2:
        raise ModelError(f"{description} returns outputs of shape {arr.shape}; flipback needs (N, classes)")
    if arr.shape[1] != num_classes:
        raise ModelError(f"{description} returns {arr.shape[1]} scores per image but the data set has "
                         f"{num_classes} classes", hint="check that the model was trained on these classes")
    scores = arr.astype(np.float32)
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).any(1).sum())
        raise BackendFailure(f"{description} returned NaN or infinite scores for {bad} of {n} images",
                             evaluated=True, retryable=False)
    t = torch.from_numpy(np.ascontiguousarray(scores))
    return t.argmax(1), t
