"""Finding the target's errors: batched top-1 predictions and a confusion matrix.

An image the model cannot answer for (NaN or infinite scores, a malformed answer) is recorded
against that image and left out of the errors; a model that answers no image at all is a
whole-run error, raised before any explaining starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..data import Dataset
from ..errors import FlipbackError, ModelError
from .progress import progress_bar

DENSE_CONFUSION = 100  # classes up to which summary.json holds the whole confusion matrix


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (or float) -> float32 NCHW in [0, 1]."""
    arr = np.ascontiguousarray(images)
    if not arr.flags.writeable:  # a slice of the read-only memory-mapped cache: tensors need their own memory
        arr = arr.copy()
    x = torch.from_numpy(arr)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class Predictions:
    labels: np.ndarray  # (N,) true labels
    predicted: np.ndarray  # (N,) top-1 of the target on the unmodified images; -1 where it gave no answer
    failed: dict[int, str] = field(default_factory=dict)  # image index -> why the target gave no answer

    @property
    def answered(self) -> np.ndarray:
        return self.predicted >= 0

    @property
    def misclassified(self) -> np.ndarray:
        return np.flatnonzero((self.predicted != self.labels) & self.answered)

    @property
    def accuracy(self) -> float:
        ok = self.answered
        return float((self.predicted[ok] == self.labels[ok]).mean()) if ok.any() else float("nan")

    def confusion(self, num_classes: int) -> np.ndarray:
        """Rows: true class, columns: predicted class (answered images only)."""
        m = np.zeros((num_classes, num_classes), dtype=np.int64)
        ok = self.answered
        np.add.at(m, (self.labels[ok], self.predicted[ok]), 1)
        return m

    def confusion_summary(self, num_classes: int) -> dict:
        """For summary.json: the whole matrix up to DENSE_CONFUSION classes; above that (an
        ImageNet model: a million cells, megabytes of zeros) the nonzero cells only, as
        `confusion_pairs` [[true, predicted, count], ...], most frequent first."""
        if num_classes <= DENSE_CONFUSION:
            return {"confusion": self.confusion(num_classes).tolist()}
        ok = self.answered
        cells, counts = np.unique(np.stack([self.labels[ok], self.predicted[ok]], 1), axis=0, return_counts=True)
        order = np.lexsort((cells[:, 1], cells[:, 0], -counts))
        return {"confusion_pairs": [[int(t), int(p), int(n)] for (t, p), n in zip(cells[order], counts[order])]}


def _top1(scores: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[np.ndarray, list[str | None]]:
    """Top-1 per image, -1 with a reason where the answer is unusable. A failed batch is asked
    again image by image, so one bad image costs only itself."""
    try:
        s = _scores_or_model_error(scores, x)
    except FlipbackError as exc:
        if not _per_image_problem(exc):
            raise
        if len(x) == 1:
            return np.array([-1]), [_reason(exc)]
        parts = [_top1(scores, x[k:k + 1]) for k in range(len(x))]
        return np.concatenate([p[0] for p in parts]), [r for p in parts for r in p[1]]
    finite = torch.isfinite(s).all(1)
    top = torch.where(finite, s.argmax(1), -1).numpy()
    return top, [None if ok else "non-finite scores: the model answered NaN or infinity" for ok in finite.tolist()]


def _scores_or_model_error(scores, x: torch.Tensor) -> torch.Tensor:
    try:
        return scores(x)
    except FlipbackError:
        raise
    except Exception as exc:  # a model that crashes on the data set's images cannot be used
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"the model fails on the data set's images ({type(exc).__name__}: {first})",
                         hint="run again with --debug for the traceback") from exc


def _per_image_problem(exc: Exception) -> bool:
    """An answer that failed for these images (not a target that is down or unusable)."""
    from ..targets.blackbox import TargetError

    return isinstance(exc, TargetError) and not getattr(exc, "transient", False)


def _reason(exc: Exception) -> str:
    return f"no answer: {getattr(exc, 'message', exc)}"


def predict_dataset(scores: Callable[[torch.Tensor], torch.Tensor], ds: Dataset, *, batch_size: int = 500,
                    show_progress: bool = True) -> Predictions:
    """`scores` must not count queries: evaluations of unmodified images are free (docs/mission)."""
    predicted = np.empty(len(ds), dtype=np.int64)
    failed: dict[int, str] = {}
    with progress_bar("predicting", total=len(ds), enabled=show_progress) as advance:
        for idx, images in ds.batches(batch_size):
            top, reasons = _top1(scores, to_tensor(images))
            predicted[idx] = top
            failed.update({int(i): r for i, r in zip(idx, reasons) if r is not None})
            if len(failed) == idx[-1] + 1:  # not one answer in the first batch: stop before any work
                raise ModelError(f"the model gave no usable answer for any of the first {len(failed)} images "
                                 f"({next(iter(failed.values()))})",
                                 hint="check the model: it must return finite class scores")
            advance(len(idx))
    return Predictions(ds.labels.copy(), predicted, failed)
