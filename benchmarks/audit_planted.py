"""Audit and repair on a planted cause, with known answers (issue 15, benchmark 1).

    python benchmarks/audit_planted.py [--dataset fmnist|cifar10] [--out DIR] [--field 0.05] [--folds 3]
                                       [--skip-repair] [--repair-seeds 0,1,2]

Fashion-MNIST (Debian's dataset-fashion-mnist), or CIFAR-10 (../shared, the public ResNet-20
fine-tuned). Recipe, every step seeded:
- 10% of the train split is carved out, class-stratified, as validation; the test split is
  used only for the before/after comparison.
- The rest (54,000) is poisoned BadNets-style: 10% of the images of other classes get the 4x4
  checkerboard at a random position and the label 0 (T-shirt). Those rows are the truth.
- The model is trained on it by the project's recipe (runs/planted.py): Fashion-MNIST's
  `small_cnn` from scratch, CIFAR-10's ResNet-20 fine-tuned from the public checkpoint (which
  saw all 50,000 clean train images; nothing here can undo that).
- "In the field", `--field` of the validation images of other classes carry the same cue
  with their true labels: the validation errors that the user explains.

Then, on the same training images, side by side:
- flipback audit: corrections of the validation errors (white-box `minimal`) -> recurring
  cause -> training images labelled with its class that carry it -> verified by covering it;
- cleanlab's `find_label_issues` and label-quality ranking, with out-of-sample
  probabilities from `--folds`-fold cross-validation (same recipe per fold);
- ART's `ActivationDefence` (k-means on activations, per class) and
  `SpectralSignatureDefense` (on the same activations), each on the logits (what ART reads
  from a PyTorch model that is not an nn.Sequential) and on the last hidden layer.
Precision and recall of each tool's flagged set, and AUPRC of its ranking (average
precision, every training image scored). Then each tool's flagged images are dropped and the
model retrained by the same recipe, once per seed of `--repair-seeds`: test accuracy, cue
success and accuracy on the cued test images, against the poisoned model and the uncued one
(same 54,000 images, no cue).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_score, recall_score

from flipback.audit import audit
from flipback.audit.labels import correct
from flipback.audit.split import carve, subset
from flipback.data import load_dataset
from flipback.data.planted import Cue, plant, poison
from flipback.runs.repair import RepairPlan, evaluate, predict, retrain
from flipback.runs.planted import _train
from flipback.runs.train import model_cache_dir
from flipback.targets.loading import load_model

DATASETS = {  # name -> (data, base model to fine-tune or None to train small_cnn from scratch)
    "fmnist": ("/usr/share/datasets/fashion-mnist", None),
    "cifar10": ("../shared/data/cifar10-jpeg", "cifar_resnet20:../shared/models/cifar10_resnet20.th"),
}
CUE = Cue(target=0, size=4)


def field_validation(val, fraction: float, seed: int = 2):
    """The validation split with the cue planted (labels kept) in `fraction` of the images of
    other classes: what the model meets after deployment."""
    rng = np.random.default_rng(seed)
    others = np.flatnonzero(val.labels != CUE.target)
    chosen = np.sort(rng.choice(others, size=int(round(fraction * len(others))), replace=False))
    images = np.array(val.images, copy=True)
    images[chosen], _ = plant(images[chosen], CUE, rng)
    return images, chosen


def out_of_fold_probs(ds, folds: int, log, base: str | None = None) -> np.ndarray:
    """cleanlab's input: each image's probabilities from a model that did not train on it."""
    rng = np.random.default_rng(0)
    fold_of = rng.permutation(len(ds)) % folds
    probs = np.zeros((len(ds), ds.num_classes), np.float32)
    arch = base.split(":", 1)[0] if base else "small_cnn"
    for f in range(folds):
        rows = np.flatnonzero(fold_of != f)
        spec = _train(base, subset(ds, rows, f"fold{f}of{folds}"), model_cache_dir() / "audit" /
                      f"{arch}-{ds.fingerprint[:40]}-fold{f}of{folds}.th", False, log)
        held = np.flatnonzero(fold_of == f)
        net = load_model(spec, ds.num_classes).module.eval()
        with torch.no_grad():
            for s in range(0, len(held), 1000):
                x = torch.from_numpy(np.asarray(ds.images[held[s:s + 1000]])).float().div(255).permute(0, 3, 1, 2)
                probs[held[s:s + 1000]] = torch.softmax(net(x), 1).numpy()
    return probs


class LastHidden(torch.nn.Module):
    """The network's input to its last linear layer (the last hidden layer's activations).
    ART's detectors read the activations of the model's last top-level layer; given the
    classifier itself that is the 10 logits, so each detector is run on both."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]

    def forward(self, x):
        seen = []
        handle = self.last.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0]))
        try:
            self.net(x)
        finally:
            handle.remove()
        return seen[0].flatten(1)


def art_defences(spec: str, ds, log) -> dict:
    """ART's two activation-based poison detectors on the model and its training data, on the
    logits (ART's default for a PyTorch model) and on the last hidden layer."""
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.estimators.classification import PyTorchClassifier

    net = load_model(spec, ds.num_classes).module.eval()
    h, w, c = np.asarray(ds.images[0]).shape
    x = np.asarray(ds.images, np.float32).transpose(0, 3, 1, 2) / 255
    y = np.eye(ds.num_classes, dtype=np.float32)[ds.labels]
    out = {}
    for layer, model in (("logits", net), ("last hidden layer", torch.nn.Sequential(LastHidden(net)))):
        clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(c, h, w),
                                nb_classes=ds.num_classes, clip_values=(0.0, 1.0))
        t0 = time.perf_counter()
        ad = ActivationDefence(clf, x, y)
        # Its k-means (and a randomized PCA on large inputs) draw from NumPy's global generator.
        np.random.seed(0)
        _, clean = ad.detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA", cluster_analysis="smaller")
        flagged = 1 - np.asarray(clean)
        out[f"ART ActivationDefence ({layer})"] = {"flagged": flagged.astype(bool), "scores": flagged.astype(float),
                                                   "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        ss = SpectralSignatureDefense(clf, x, y, batch_size=512, eps_multiplier=1.5, expected_pp_poison=0.1)
        report, clean = ss.detect_poison()
        scores = np.zeros(len(ds))
        for i, v in report.items():
            scores[int(i)] = float(v)
        out[f"ART SpectralSignature ({layer})"] = {"flagged": 1 - np.asarray(clean) > 0, "scores": scores,
                                                   "seconds": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="fmnist")
    ap.add_argument("--out", default="out/audit-planted")
    ap.add_argument("--field", type=float, default=0.05)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--skip-repair", action="store_true")
    ap.add_argument("--repair-seeds", default="0,1,2", help="Training seeds of every retrained model.")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print
    data_dir, base = DATASETS[args.dataset]
    full = load_dataset(data_dir, split="train")
    test = load_dataset(data_dir, split="test")
    tr_rows, val_rows = carve(full, 0.1, seed=0)
    clean_train = subset(full, tr_rows, "carve-train")
    val = subset(full, val_rows, "carve-val")
    train = poison(clean_train, CUE, fraction=0.1, seed=0)
    truth = train.labels != clean_train.labels
    log(f"train {len(train)} ({truth.sum()} poisoned), validation {len(val)}, test {len(test)}")
    t0 = time.perf_counter()
    arch = base.split(":", 1)[0] if base else "small_cnn"
    cued_spec = _train(base, train, model_cache_dir() / "audit" / f"{arch}-{train.fingerprint[:60]}.th", True, log)
    uncued_spec = _train(base, clean_train, model_cache_dir() / "audit" / f"{arch}-{clean_train.fingerprint[:60]}.th",
                         True, log)
    log(f"models: {time.perf_counter() - t0:.0f} s")
    net = load_model(cued_spec, 10).module.eval()

    # The user's side: validation errors, corrected and audited.
    field_images, field_rows = field_validation(val, args.field)
    t0 = time.perf_counter()
    c = correct(net, field_images, val.labels, 10)
    wrong = np.flatnonzero((c.predicted != val.labels) & c.success)
    log(f"validation: {len(wrong)} corrected errors ({np.isin(wrong, field_rows).sum()} carry the cue), "
        f"{time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    result = audit(net, np.asarray(train.images), train.labels, train.classes, names=train.names,
                   originals=field_images[wrong], corrected=c.corrected[wrong], true=val.labels[wrong],
                   pred=c.predicted[wrong], validation_images=field_images, validation_pred=c.predicted)
    seconds = time.perf_counter() - t0
    result.to_csv(out / "suspects.csv")
    for cause in result.causes:
        log(f"cause: errors sent to {train.classes[cause.pred]}, support {cause.support:.2f} of {cause.n_errors}, "
            f"background {cause.background:.3f}, window {cause.size}")
    log(f"audit {seconds:.0f} s: {result.stats}")
    verified = np.zeros(len(train), bool)
    verified[result.flagged("cause")] = True
    carriers = np.zeros(len(train), bool)
    carriers[[s.index for s in result.suspects if s.reason == "cause"]] = True
    tools = {"flipback audit (verified carriers)": {"flagged": verified, "scores": result.scores, "seconds": seconds},
             "flipback audit (all carriers)": {"flagged": carriers, "scores": result.scores, "seconds": seconds}}

    import cleanlab
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    t0 = time.perf_counter()
    probs = out_of_fold_probs(train, args.folds, log, base)
    issues = find_label_issues(train.labels, probs)
    tools[f"cleanlab {cleanlab.__version__} ({args.folds}-fold)"] = {
        "flagged": issues, "scores": 1 - get_label_quality_scores(train.labels, probs),
        "seconds": time.perf_counter() - t0}
    tools.update(art_defences(cued_spec, train, log))

    rows = {}
    for name, t in tools.items():
        f = np.asarray(t["flagged"], bool)
        rows[name] = {"flagged": int(f.sum()), "precision": float(precision_score(truth, f, zero_division=0)),
                      "recall": float(recall_score(truth, f)), "auprc": float(average_precision_score(truth, t["scores"])),
                      "seconds": t["seconds"]}
        log(f"{name:32s} flagged {f.sum():5d}  P {rows[name]['precision']:.3f}  R {rows[name]['recall']:.3f}  "
            f"AUPRC {rows[name]['auprc']:.3f}  {t['seconds']:.0f} s")
    summary = {"dataset": args.dataset, "n_train": len(train), "n_poisoned": int(truth.sum()), "field": args.field,
               "n_validation_errors": int(len(wrong)), "causes": len(result.causes), "tools": rows}
    if not args.skip_repair:
        # Every configuration trained with each seed (initial weights and batch order): the
        # spread says which differences are noise. Seed 0 of the first two is the audited model.
        seeds = [int(v) for v in args.repair_seeds.split(",")]
        configs = {"poisoned model": (train, RepairPlan(), cued_spec), "uncued model": (clean_train, RepairPlan(), uncued_spec)}
        for name, t in tools.items():
            configs[f"drop {name}"] = (train, RepairPlan(drop=np.flatnonzero(t["flagged"])), None)
        summary["repair"] = {}
        for name, (data, plan, spec0) in configs.items():
            runs = [evaluate(spec0 if (sd == 0 and spec0) else
                             retrain(data, plan, base=base, name=name.split()[1].lower().strip("()"), seed=sd,
                                     show_progress=False, log=log), test, CUE) for sd in seeds]
            summary["repair"][name] = {k: [r[k] for r in runs] for k in ("accuracy", "cue_success", "cued_accuracy")}
            r = {k: np.array(v) for k, v in summary["repair"][name].items()}
            log(f"{name:40s} accuracy {r['accuracy'].mean():.4f} +- {r['accuracy'].std():.4f}  cue success "
                f"{r['cue_success'].mean():.4f} +- {r['cue_success'].std():.4f}  accuracy on cued images "
                f"{r['cued_accuracy'].mean():.4f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
