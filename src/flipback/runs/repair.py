"""Repair: apply an audit's plan to the training data, retrain, and compare on the test split.

A plan drops suspects, relabels them, or adds corrective examples (validation errors with
their true labels, once corrected: flipback's verified changes). The model is retrained by the
project's own recipe (`runs.planted`: small_cnn from scratch, any other zoo model fine-tuned
from its weights), so that before and after differ only in the data. The comparison is on
the untouched test split: accuracy, errors per confusion pair and, where a cause was planted,
that cause's attack success.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import Dataset
from ..data.planted import Cue, cued_test_images
from ..targets.loading import load_model
from .errors import to_tensor
from .planted import _train
from .train import model_cache_dir


# A relabelled image's target: this much on the model's answer, the rest on its given label.
# Chosen on the label-noise benchmark's validation draw (benchmarks/audit_label_noise.py --seed 1
# --validation; docs/benchmarks.md): a hard relabel of the flagged images (precision about 0.8)
# lost to the noisy labels, 0.7 gained about a quarter of what the noise costs.
RELABEL_WEIGHT = 0.7


@dataclass
class RepairPlan:
    drop: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # training rows to leave out
    relabel: dict = field(default_factory=dict)  # training row -> new label
    # The share of a relabelled row's training target on its new label; the rest stays on the
    # given one (soft labels). 1 is a hard relabel. Below 1 a right label that was flagged by
    # mistake is not erased (see RELABEL_WEIGHT).
    relabel_weight: float = 1.0
    extra_images: np.ndarray | None = None  # (M, H, W, C) uint8 added to the training data
    extra_labels: np.ndarray | None = None

    def __post_init__(self):
        if not 0 < self.relabel_weight <= 1:
            raise ValueError(f"relabel_weight must be in (0, 1]; got {self.relabel_weight}")

    def describe(self) -> dict:
        out = {"dropped": int(len(self.drop)), "relabelled": len(self.relabel),
               "added": 0 if self.extra_labels is None else int(len(self.extra_labels))}
        if self.relabel and self.relabel_weight < 1:
            out["relabel_weight"] = self.relabel_weight
        return out


def _kept_rows(ds: Dataset, plan: RepairPlan) -> np.ndarray:
    """The rows a plan keeps, in the order the planned data set has them (extras follow)."""
    return np.setdiff1d(np.arange(len(ds)), np.asarray(plan.drop, np.int64))


def apply_plan(ds: Dataset, plan: RepairPlan) -> Dataset:
    labels = np.array(ds.labels, copy=True)
    for row, new in plan.relabel.items():
        labels[int(row)] = int(new)
    keep = _kept_rows(ds, plan)
    images, labels, names = np.asarray(ds.images[keep]), labels[keep], [ds.names[i] for i in keep]
    if plan.extra_labels is not None and len(plan.extra_labels):
        images = np.concatenate([images, plan.extra_images])
        labels = np.concatenate([labels, np.asarray(plan.extra_labels, labels.dtype)])
        names = names + [f"corrective-{i}" for i in range(len(plan.extra_labels))]
    digest = hashlib.sha256(np.asarray(plan.drop, np.int64).tobytes() + repr(sorted(plan.relabel.items())).encode())
    if plan.relabel and plan.relabel_weight < 1:  # a hard relabel keeps the names of models cached before
        digest.update(f"weight{plan.relabel_weight:g}".encode())
    if plan.extra_images is not None:
        digest.update(np.ascontiguousarray(plan.extra_images).tobytes())
        digest.update(np.asarray(plan.extra_labels, np.int64).tobytes())
    return Dataset(images, labels, ds.classes, names, source=ds.source,
                   fingerprint=f"{ds.fingerprint}-repair{digest.hexdigest()[:12]}")


def plan_targets(ds: Dataset, plan: RepairPlan) -> np.ndarray | None:
    """Soft training targets (rows of apply_plan's data set, in its order), or None where
    every label is hard: a relabelled row puts `relabel_weight` on its new label and the rest
    on its given one."""
    if not plan.relabel or plan.relabel_weight >= 1:
        return None
    k = ds.num_classes
    targets = np.eye(k, dtype=np.float32)[np.asarray(ds.labels, np.int64)]
    rows = np.array(sorted(plan.relabel), np.int64)
    new = np.array([plan.relabel[int(r)] for r in rows], np.int64)
    targets[rows] *= 1 - plan.relabel_weight
    targets[rows, new] += plan.relabel_weight
    targets = targets[_kept_rows(ds, plan)]
    if plan.extra_labels is not None and len(plan.extra_labels):
        targets = np.concatenate([targets, np.eye(k, dtype=np.float32)[np.asarray(plan.extra_labels, np.int64)]])
    return targets


def predict(spec: str, num_classes: int, images: np.ndarray) -> np.ndarray:
    net = load_model(spec, num_classes).module.eval()
    with torch.no_grad():
        return np.concatenate([net(to_tensor(np.asarray(images[i:i + 500]))).argmax(1).numpy()
                               for i in range(0, len(images), 500)]) if len(images) else np.zeros(0, np.int64)


def evaluate(spec: str, test: Dataset, cue: Cue | None = None) -> dict:
    """Accuracy, errors per confusion pair (true -> predicted, by name) and, with a cue, the
    share of cued test images of other classes sent to the cue's class and the accuracy on them."""
    k = test.num_classes
    pred = predict(spec, k, test.images)
    wrong = pred != test.labels
    pairs: dict[str, int] = {}
    for t, p in zip(test.labels[wrong], pred[wrong]):
        key = f"{test.classes[t]} -> {test.classes[p]}"
        pairs[key] = pairs.get(key, 0) + 1
    out = {"model": spec, "accuracy": float((~wrong).mean()), "errors": int(wrong.sum()),
           "pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1]))}
    if cue is not None:
        cued = cued_test_images(test, cue)
        answers = predict(spec, k, cued.images)
        out["cue_success"] = float((answers == cue.target).mean())
        out["cued_accuracy"] = float((answers == cued.labels).mean())  # the same images, right answers
    return out


def retrain(train: Dataset, plan: RepairPlan, *, base: str | None = None, name: str = "repaired", seed: int = 0,
            show_progress: bool = True, log=print) -> str:
    """A model trained on the planned data by the project's recipe (cached by content);
    `seed` sets the initial weights (from scratch) and the order of the batches."""
    data = apply_plan(train, plan)
    arch = base.split(":", 1)[0] if base else "small_cnn"
    key = hashlib.sha256(f"{data.fingerprint}|{arch}|{base}".encode()).hexdigest()[:12]
    # "s": the fine-tuning subset is drawn by the seed (runs/planted.py); before, every seed drew
    # seed 0's, so an older cached seed-N model is another model. Seed 0's draw is unchanged.
    tag = f"-seed{seed}s" if seed else ""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "", name) or "repaired"  # a file name: no brackets, spaces or slashes
    return _train(base, data, model_cache_dir() / "repaired" / f"{arch}-{name}-{key}{tag}.th", show_progress, log,
                  seed=seed, targets=plan_targets(train, plan))


@dataclass
class RepairResult:
    model: str  # the retrained model's SPEC
    plan: dict  # how many images were dropped, relabelled, added
    before: dict  # evaluate() of the model before, on the test split
    after: dict  # and of the retrained one


def repair(train: Dataset, test: Dataset, plan: RepairPlan, *, model: str, cue: Cue | None = None,
           show_progress: bool = True, log=print) -> RepairResult:
    """Retrain `model` (a SPEC; small_cnn from scratch, other zoo models fine-tuned from it)
    on `train` changed by `plan`, and compare both on `test`."""
    base = None if model.split(":", 1)[0] == "small_cnn" else model
    spec = retrain(train, plan, base=base, show_progress=show_progress, log=log)
    return RepairResult(spec, plan.describe(), evaluate(model, test, cue), evaluate(spec, test, cue))
