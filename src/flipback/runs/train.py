"""Training and fine-tuning zoo models, cached by the data set's fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset
from ..targets.zoo import ZOO, Normalized
from .errors import to_tensor
from .progress import progress_bar


def model_cache_dir() -> Path:
    root = os.environ.get("FLIPBACK_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "flipback") / "models"


def fit(model: nn.Module, ds: Dataset, *, epochs: int, lr: float, optimizer: str = "adam", batch_size: int = 128,
        seed: int = 0, flip: bool = False, description: str = "training", show_progress: bool = True,
        targets: np.ndarray | None = None) -> nn.Module:
    """Cross-entropy training of `model` (which takes [0,1] pixels) on `ds`, with a one-cycle
    learning rate peaking at `lr`. `flip` adds random horizontal flips (natural images only).
    `targets` (N, K), rows summing to 1, replaces the labels by soft ones."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = (torch.optim.Adam(params, lr=lr / 3) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(ds) // batch_size))
    model.train()
    with progress_bar(description, total=epochs * len(ds), enabled=show_progress) as advance:
        for _ in range(epochs):
            order = rng.permutation(len(ds))
            for start in range(0, len(ds), batch_size):
                idx = np.sort(order[start:start + batch_size])
                x = to_tensor(ds.images[idx])
                if flip:
                    mirror = torch.from_numpy(rng.random(len(idx)) < 0.5)
                    x = torch.where(mirror[:, None, None, None], x.flip(3), x)
                want = torch.from_numpy(ds.labels[idx] if targets is None else targets[idx])
                loss = F.cross_entropy(model(x), want)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                advance(len(idx))
    return model.eval()


def save_weights(net: nn.Module, out: Path, **meta) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save({"state_dict": net.state_dict(), **meta}, tmp)
    tmp.replace(out)  # atomic: a killed training never leaves a half-written model
    return out


def train_small_cnn(ds: Dataset, out: Path, *, epochs: int = 3, batch_size: int = 128, seed: int = 0,
                    show_progress: bool = True) -> Path:
    """Train `small_cnn` on `ds` and save its weights (a plain state_dict) to `out`."""
    torch.manual_seed(seed)
    entry = ZOO["small_cnn"]
    net = entry.build(ds.num_classes)
    fit(Normalized(net, entry.mean, entry.std), ds, epochs=epochs, lr=3e-3, batch_size=batch_size, seed=seed,
        description="training small_cnn", show_progress=show_progress)
    return save_weights(net, out, arch="small_cnn", classes=ds.classes)
