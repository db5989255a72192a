"""A served callable that answers NaN scores for images whose first pixel is above 0.5."""

import numpy as np


def predict(x: np.ndarray) -> np.ndarray:
    out = np.zeros((len(x), 10), np.float32)
    out[:, 0] = 1.0
    out[x[:, 0, 0, 0] > 0.5] = np.nan
    return out
