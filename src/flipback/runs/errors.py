"""Finding the target's errors: batched top-1 predictions and a confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data import Dataset
from .progress import progress_bar


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (or float) -> float32 NCHW in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class Predictions:
    labels: np.ndarray  # (N,) true labels
    predicted: np.ndarray  # (N,) top-1 of the target on the unmodified images

    @property
    def misclassified(self) -> np.ndarray:
        return np.flatnonzero(self.predicted != self.labels)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.labels).mean()) if len(self.labels) else float("nan")

    def confusion(self, num_classes: int) -> np.ndarray:
        """Rows: true class, columns: predicted class."""
        m = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(m, (self.labels, self.predicted), 1)
        return m


def predict_dataset(scores: Callable[[torch.Tensor], torch.Tensor], ds: Dataset, *, batch_size: int = 500,
                    show_progress: bool = True) -> Predictions:
    """`scores` must not count queries: evaluations of unmodified images are free (docs/mission)."""
    predicted = np.empty(len(ds), dtype=np.int64)
    with progress_bar("predicting", total=len(ds), enabled=show_progress) as advance:
        for idx, images in ds.batches(batch_size):
            predicted[idx] = scores(to_tensor(images)).argmax(1).numpy()
            advance(len(idx))
    return Predictions(ds.labels.copy(), predicted)
