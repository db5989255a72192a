"""Validation carved from the training data: the audit never looks at the test split."""

from __future__ import annotations

import numpy as np

from ..data import Dataset


def subset(ds: Dataset, rows: np.ndarray, tag: str) -> Dataset:
    rows = np.asarray(rows, dtype=np.int64)
    return Dataset(np.asarray(ds.images[rows]), np.asarray(ds.labels[rows]), ds.classes, [ds.names[i] for i in rows],
                   source=ds.source, fingerprint=f"{ds.fingerprint}-{tag}")


def carve(ds: Dataset, fraction: float = 0.1, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a seeded, class-stratified `fraction` of `ds` held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(ds.labels)
    held = [rng.permutation(rows)[:int(round(fraction * len(rows)))]
            for rows in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    val = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), val), val
