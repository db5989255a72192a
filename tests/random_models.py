"""Untrained models for tests that need a model file but not a good model."""

from __future__ import annotations

from pathlib import Path

import torch

from flipback.targets.surrogate import Surrogate, build_surrogate, save_surrogate


def save_random_surrogate(path: Path, num_classes: int = 10, *, seed: int = 1, with_classes: bool = True) -> Path:
    """A one-member surrogate (`cnn8`) for 1x28x28 images with seeded random weights, saved as
    `flipback surrogate` would save it (zero queries, zero agreement)."""
    torch.manual_seed(seed)
    meta = {"members": ["cnn8"], "num_classes": num_classes, "input_shape": [1, 28, 28],
            "queries": 0, "held_out": 0, "agreement": 0.0, "output": "scores", "epochs": 0, "target": "",
            "seed": seed}
    if with_classes:
        meta["classes"] = [str(i) for i in range(num_classes)]
    return save_surrogate(Surrogate(build_surrogate(num_classes, 1, ["cnn8"]).eval(), meta), path)
