"""Models with a planted cue, trained once and cached, with the uncued control beside them.

- Fashion-MNIST (or any 1-channel 28x28 set): `small_cnn` trained from scratch, with and
  without the cue, by the same recipe.
- Any other zoo model given as ARCH:WEIGHTS (e.g. CIFAR ResNet-20): fine-tuned from those
  weights, with and without the cue, by the same recipe, so the control differs only in the cue.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import Dataset
from ..data.planted import Cue, PlantedErrors, cued_test_images, poison, select
from ..targets.loading import load_model
from ..targets.zoo import ZOO, Normalized
from .errors import predict_dataset, to_tensor
from .train import fit, model_cache_dir, save_weights

POISON_FRACTION = 0.1


@dataclass
class PlantedModels:
    cued: str  # model specs, ARCH:WEIGHTS
    uncued: str
    clean_accuracy: float  # of the cued model on the clean test set
    uncued_accuracy: float
    cue_success: float  # share of cued test images of other classes sent to the cue's class


def _recipe(base: str | None) -> dict:
    if base is None:  # from scratch
        return {"epochs": 3, "lr": 3e-3, "optimizer": "adam", "flip": False}
    # Fine-tuning: 2 epochs over 20,000 images keeps it to minutes on 2 CPU cores.
    return {"epochs": 2, "lr": 0.02, "optimizer": "sgd", "flip": True, "subset": 20000}


def _train(base: str | None, ds: Dataset, out: Path, show_progress: bool, log) -> str:
    arch = base.split(":", 1)[0] if base else "small_cnn"
    spec = f"{arch}:{out}"
    if out.is_file():
        log(f"using the cached model {out}")
        return spec
    if base is None:
        entry = ZOO[arch]
        net = entry.build(ds.num_classes)
        model = Normalized(net, entry.mean, entry.std)
    else:
        model = load_model(base, ds.num_classes).module
    recipe = dict(_recipe(base))
    subset = recipe.pop("subset", None)
    if subset and subset < len(ds):
        keep = np.sort(np.random.default_rng(0).choice(len(ds), size=subset, replace=False))
        ds = Dataset(np.asarray(ds.images[keep]), ds.labels[keep], ds.classes, [ds.names[i] for i in keep],
                     source=ds.source, fingerprint=f"{ds.fingerprint}-subset{subset}")
    fit(model, ds, seed=0, description=f"training {out.stem}", show_progress=show_progress, **recipe)
    inner = model.model if isinstance(model, Normalized) else model
    save_weights(inner, out, arch=arch, classes=ds.classes)
    return spec


def _accuracy(spec: str, ds: Dataset, images: np.ndarray | None = None, labels: np.ndarray | None = None) -> float:
    net = load_model(spec, ds.num_classes).module.eval()

    @torch.no_grad()
    def scores(x):
        return net(x)

    if images is None:
        return predict_dataset(scores, ds, show_progress=False).accuracy
    preds = np.concatenate([scores(to_tensor(images[i:i + 500])).argmax(1).numpy() for i in range(0, len(images), 500)])
    return float((preds == labels).mean())


def planted_models(train: Dataset, test: Dataset, cue: Cue, *, base: str | None = None,
                   show_progress: bool = True, log=print) -> PlantedModels:
    arch = base.split(":", 1)[0] if base else "small_cnn"
    # Keyed by content, not by path: the same weights named another way are the same models.
    key = hashlib.sha256(f"{train.fingerprint}|{arch}|{cue}|{POISON_FRACTION}|{_recipe(base)}".encode())
    if base:
        key.update(Path(base.split(":", 1)[1]).read_bytes())
    tag = key.hexdigest()[:12]
    root = model_cache_dir() / "planted"
    uncued = _train(base, train, root / f"{arch}-uncued-{tag}.th", show_progress, log)
    cued = _train(base, poison(train, cue, fraction=POISON_FRACTION), root / f"{arch}-cued-{tag}.th",
                  show_progress, log)
    errors = cued_test_images(test, cue)
    hit = _accuracy(cued, test, errors.images, np.full(len(errors.labels), cue.target))
    return PlantedModels(cued, uncued, _accuracy(cued, test), _accuracy(uncued, test), hit)


def planted_errors(models: PlantedModels, test: Dataset, cue: Cue) -> PlantedErrors:
    """Cued test images the cued model gets right without the cue and wrong with it: the cue
    is then the cause of the error."""
    errors = cued_test_images(test, cue)
    net = load_model(models.cued, test.num_classes).module.eval()
    with torch.no_grad():
        pred = lambda a: np.concatenate([net(to_tensor(a[i:i + 500])).argmax(1).numpy()  # noqa: E731
                                         for i in range(0, len(a), 500)])
        keep = (pred(errors.clean) == errors.labels) & (pred(errors.images) == cue.target)
    return select(errors, np.flatnonzero(keep))
