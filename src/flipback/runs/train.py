"""Training the demo's small CNN once, cached by the data set's fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Dataset
from ..targets.zoo import ZOO
from .errors import to_tensor
from .progress import progress_bar


def model_cache_dir() -> Path:
    root = os.environ.get("FLIPBACK_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "flipback") / "models"


def train_small_cnn(ds: Dataset, out: Path, *, epochs: int = 3, batch_size: int = 128, seed: int = 0,
                    show_progress: bool = True) -> Path:
    """Train `small_cnn` on `ds` and save its weights (a plain state_dict) to `out`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    entry = ZOO["small_cnn"]
    net = entry.build(ds.num_classes)
    mean = torch.tensor(entry.mean).view(1, -1, 1, 1)
    std = torch.tensor(entry.std).view(1, -1, 1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-len(ds) // batch_size))
    net.train()
    with progress_bar("training small_cnn", total=epochs * len(ds), enabled=show_progress) as advance:
        for _ in range(epochs):
            order = rng.permutation(len(ds))
            for start in range(0, len(ds), batch_size):
                idx = np.sort(order[start:start + batch_size])
                x = (to_tensor(ds.images[idx]) - mean) / std
                loss = F.cross_entropy(net(x), torch.from_numpy(ds.labels[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                advance(len(idx))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save({"state_dict": net.state_dict(), "arch": "small_cnn", "classes": ds.classes}, tmp)
    tmp.replace(out)  # atomic: a killed training never leaves a half-written model
    return out
