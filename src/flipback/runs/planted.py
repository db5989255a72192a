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
from ..data.planted import Cue, PlantedErrors, cued_test_images, plant, poison, select
from ..targets.loading import load_model
from ..targets.zoo import ZOO, Normalized
from .errors import to_tensor
from .train import fit, model_cache_dir, save_weights

POISON_FRACTION = 0.1


@dataclass
class PlantedModels:
    cued: str  # model specs, ARCH:WEIGHTS
    uncued: str
    clean_accuracy: float  # of the cued model on the clean test set
    uncued_accuracy: float
    cue_success: float  # share of cued test images of other classes sent to the cue's class
    # or/and: the same share with only the first / only the second patch (OR: high; AND: low)
    part_success: dict | None = None


def _recipe(base: str | None) -> dict:
    if base is None:  # from scratch
        return {"epochs": 3, "lr": 3e-3, "optimizer": "adam", "flip": False}
    # Fine-tuning: 2 epochs over 20,000 images keeps it to minutes on 2 CPU cores.
    return {"epochs": 2, "lr": 0.02, "optimizer": "sgd", "flip": True, "subset": 20000}


def subset_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The rows a fine-tune trains on: drawn by the training seed. With one fixed draw every
    seed of a comparison sees the same subset, and a drop of any rows changes which subset
    it is, so a random drop could "help" only by leaving a better subset."""
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _train(base: str | None, ds: Dataset, out: Path, show_progress: bool, log, seed: int = 0,
           targets: np.ndarray | None = None) -> str:
    arch = base.split(":", 1)[0] if base else "small_cnn"
    spec = f"{arch}:{out}"
    if out.is_file():
        log(f"using the cached model {out}")
        return spec
    torch.manual_seed(seed)  # the initial weights too: the same data gives the same model in any process
    if base is None:
        entry = ZOO[arch]
        net = entry.build(ds.num_classes)
        model = Normalized(net, entry.mean, entry.std)
    else:
        model = load_model(base, ds.num_classes).module
    recipe = dict(_recipe(base))
    subset = recipe.pop("subset", None)
    if subset and subset < len(ds):
        keep = subset_rows(len(ds), subset, seed)
        ds = Dataset(np.asarray(ds.images[keep]), ds.labels[keep], ds.classes, [ds.names[i] for i in keep],
                     source=ds.source, fingerprint=f"{ds.fingerprint}-subset{subset}")
        targets = None if targets is None else targets[keep]
    fit(model, ds, seed=seed, description=f"training {out.stem}", show_progress=show_progress, targets=targets,
        **recipe)
    inner = model.model if isinstance(model, Normalized) else model
    save_weights(inner, out, arch=arch, classes=ds.classes)
    return spec


def _predict(spec: str, num_classes: int, images: np.ndarray) -> np.ndarray:
    """The model's top-1 answers on (N,H,W,C) uint8 images, 500 at a time."""
    net = load_model(spec, num_classes).module.eval()
    with torch.no_grad():
        return np.concatenate([net(to_tensor(np.array(images[i:i + 500]))).argmax(1).numpy()
                               for i in range(0, len(images), 500)])


def planted_models(train: Dataset, test: Dataset, cue: Cue, *, base: str | None = None,
                   show_progress: bool = True, log=print) -> PlantedModels:
    arch = base.split(":", 1)[0] if base else "small_cnn"
    # Keyed by content, not by path: the same weights named another way are the same models.
    weights = Path(base.split(":", 1)[1]).read_bytes() if base else b""

    def tag(*parts) -> str:
        key = hashlib.sha256("|".join(map(str, (train.fingerprint, arch, *parts, _recipe(base)))).encode())
        key.update(weights)
        return key.hexdigest()[:12]

    root = model_cache_dir() / "planted"
    # The control never sees the cue, so one control serves every kind and size of cue.
    uncued = _train(base, train, root / f"{arch}-control-{tag()}.th", show_progress, log)
    cued = _train(base, poison(train, cue, fraction=POISON_FRACTION),
                  root / f"{arch}-cued-{tag(cue, POISON_FRACTION)}.th", show_progress, log)
    k = test.num_classes
    hit = float((_predict(cued, k, cued_test_images(test, cue).images) == cue.target).mean())
    parts = None
    if cue.n_parts > 1:  # does each patch alone trigger? it should for OR, not for AND
        others = np.asarray(test.images[test.labels != cue.target])
        parts = {which: float((_predict(cued, k, plant(others, cue, np.random.default_rng(1), which)[0])
                               == cue.target).mean()) for which in ("a", "b")}
    return PlantedModels(cued, uncued, float((_predict(cued, k, test.images) == test.labels).mean()),
                         float((_predict(uncued, k, test.images) == test.labels).mean()), hit, parts)


def planted_errors(models: PlantedModels, test: Dataset, cue: Cue) -> PlantedErrors:
    """Cued test images the cued model gets right without the cue and wrong with it: the cue
    is then the cause of the error."""
    errors = cued_test_images(test, cue)
    k = test.num_classes
    keep = (_predict(models.cued, k, errors.clean) == errors.labels) & \
        (_predict(models.cued, k, errors.images) == cue.target)
    return select(errors, np.flatnonzero(keep))
