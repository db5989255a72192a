"""Audit and repair of injected label noise, with known answers (issue 15, benchmark 2).

    python benchmarks/audit_label_noise.py [--out DIR] [--noise 0.1] [--folds 3]
    python benchmarks/audit_label_noise.py --seed 1 --validation      # choosing a repair rule

Fashion-MNIST's train split with `--noise` of its labels flipped (seeded) the way annotators
confuse these classes: T-shirt <-> Shirt, Pullover <-> Coat, Sneaker <-> Sandal,
Ankle boot -> Sneaker, Dress -> Shirt, Trouser -> Dress (Bag is never flipped; the flipped
images are drawn from the other nine classes).

Both tools get the same out-of-sample evidence: `--folds` models trained by the project's
recipe (runs/planted.py), each on the other folds.
- cleanlab: `find_label_issues` on the fold models' probabilities, ranked by
  `get_label_quality_scores`; its repair is `CleanLearning.fit` given those label issues
  (it drops them and trains the same classifier).
- flipback: for every image its fold model disagrees with, the smallest verified 8-bit change
  toward the given label (white-box `minimal`); ranked by its L2, flagged when it is at least
  the median over all disagreements (audit/labels.py). Its repair relabels the flagged images
  toward the fold model's answer: soft labels, RELABEL_WEIGHT (0.7) of the target on the
  answer and the rest on the given label (runs/repair.py); a hard relabel and a drop of them
  are shown too.
AUPRC (average precision over every training image), precision and recall of the flagged
sets, then the test accuracy of each repaired model against training on the noisy labels
(each trained with every seed of `--repair-seeds`).
The test split is used only for that last comparison. Two more rows read the truth, as
references: the flipped labels among the flagged ones, and among all disagreements, given back
their true labels (nothing else changed): what a perfect relabelling of what the evidence can
reach would gain.

`--validation` (on another noise draw, `--seed 1`) chooses between repair rules without the
test split: 10% of the train split is held out, everything else runs on the rest, and each
rule (relabel the disagreements at relative L2 >= t for several t, hard or soft, drop them,
or both) is scored by the accuracy of its model on the held-out images' true labels.
`--rules REGEX` runs only the rules whose names match (the noisy and clean references always
run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import average_precision_score, precision_score, recall_score

from flipback.audit.labels import LabelEvidence, label_evidence, relative_scores
from flipback.audit.split import carve, subset
from flipback.data import Dataset, load_dataset
from flipback.runs.planted import _train
from flipback.runs.repair import RELABEL_WEIGHT, RepairPlan, evaluate, retrain
from flipback.runs.train import model_cache_dir
from flipback.targets.loading import load_model

FMNIST = "/usr/share/datasets/fashion-mnist"
# Fashion-MNIST classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
# 7 Sneaker, 8 Bag, 9 Ankle boot.
CONFUSIONS = {0: 6, 6: 0, 2: 4, 4: 2, 7: 5, 5: 7, 9: 7, 3: 6, 1: 3}


def noisy(ds: Dataset, rate: float, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(np.isin(ds.labels, list(CONFUSIONS)))
    flipped = np.sort(rng.choice(candidates, size=int(round(rate * len(ds))), replace=False))
    labels = np.array(ds.labels, copy=True)
    labels[flipped] = [CONFUSIONS[int(c)] for c in labels[flipped]]
    truth = np.zeros(len(ds), bool)
    truth[flipped] = True
    return Dataset(np.asarray(ds.images), labels, ds.classes, list(ds.names), source=ds.source,
                   fingerprint=f"{ds.fingerprint}-asym{rate}-s{seed}"), truth


def fold_models(ds: Dataset, folds: int, log) -> tuple[np.ndarray, list[str]]:
    fold_of = np.random.default_rng(0).permutation(len(ds)) % folds
    specs = [_train(None, subset(ds, np.flatnonzero(fold_of != f), f"fold{f}of{folds}"),
                    model_cache_dir() / "audit" / f"{ds.fingerprint[:50]}-fold{f}of{folds}.th", False, log)
             for f in range(folds)]
    return fold_of, specs


class SmallCNN(BaseEstimator, ClassifierMixin):
    """The project's recipe as a scikit-learn classifier, for cleanlab's CleanLearning."""

    def __init__(self, classes=None, tag: str = "cleanlearning", seed: int = 0):
        self.classes = classes
        self.tag = tag
        self.seed = seed

    def fit(self, X, y, sample_weight=None):
        ds = Dataset(np.asarray(X, np.uint8), np.asarray(y, np.int64), list(self.classes), [str(i) for i in range(len(y))],
                     fingerprint=f"{self.tag}-{len(y)}-{hashlib.sha256(np.asarray(y).tobytes()).hexdigest()[:12]}")
        self.spec_ = _train(None, ds, model_cache_dir() / "audit" / f"{ds.fingerprint}-seed{self.seed}.th", False, print,
                            seed=self.seed)
        self.classes_ = np.arange(len(self.classes))
        return self

    def predict_proba(self, X):
        net = load_model(self.spec_, len(self.classes)).module.eval()
        with torch.no_grad():
            return np.concatenate([torch.softmax(net(torch.from_numpy(np.asarray(X[i:i + 1000])).float().div(255)
                                                     .permute(0, 3, 1, 2)), 1).numpy() for i in range(0, len(X), 1000)])

    def predict(self, X):
        return self.predict_proba(X).argmax(1)


def oracle_plans(train: Dataset, clean: Dataset, truth: np.ndarray, disagree: np.ndarray,
                 flagged: np.ndarray) -> dict:
    """References that read the truth: what the flipped labels a detector could find (the fold
    model disagrees; flagged or not) cost, when given back their true labels and nothing else."""
    return {name: (train, RepairPlan(relabel={int(i): int(clean.labels[i]) for i in np.flatnonzero(rows & truth)}))
            for name, rows in (("oracle: the flagged flipped ones fixed", flagged),
                               ("oracle: every disagreeing flipped one fixed", disagree))}


def choose_rule(train: Dataset, clean: Dataset, val: Dataset, truth: np.ndarray, ev: LabelEvidence,
                seeds: list[int], out: Path, rows: dict, log, rules: str = "") -> None:
    """Validation accuracy (true labels) of models trained on the labels each rule repairs:
    relabel the disagreements whose relative L2 is at least t, for several t, hard or soft
    (a share w of the target on the answer), or drop them."""
    disagree = ev.predicted != train.labels

    def relabel(t: float) -> dict:
        return {int(i): int(ev.predicted[i]) for i in np.flatnonzero(disagree & (ev.relative >= t))}
    configs = {"noisy labels": (train, RepairPlan()), "clean labels (reference)": (clean, RepairPlan()),
               "drop at >= 1": (train, RepairPlan(drop=np.flatnonzero(disagree & (ev.relative >= 1))))}
    for t in (1.0, 1.5, 2.0, 3.0):
        configs[f"relabel at >= {t:g}"] = (train, RepairPlan(relabel=relabel(t)))
    configs["relabel at >= 2, drop [1, 2)"] = (train, RepairPlan(
        relabel=relabel(2.0), drop=np.flatnonzero(disagree & (ev.relative >= 1) & (ev.relative < 2))))
    for w in (0.5, 0.6, 0.7, 0.8):
        configs[f"soft relabel at >= 1, weight {w:g}"] = (train, RepairPlan(relabel=relabel(1.0), relabel_weight=w))
    configs.update(oracle_plans(train, clean, truth, disagree, disagree & (ev.relative >= 1)))
    if rules:
        configs = {name: c for name, c in configs.items()
                   if name.startswith(("noisy labels", "clean labels")) or re.search(rules, name)}
    results = {}
    for name, (data, plan) in configs.items():
        changed = np.array(sorted(plan.relabel), dtype=np.int64)
        tag = "val-" + name.split()[0].strip(":,")
        runs = [evaluate(retrain(data, plan, name=tag, seed=sd, show_progress=False, log=log), val) for sd in seeds]
        acc = np.array([r["accuracy"] for r in runs])
        results[name] = {"accuracy": acc.tolist(), "relabelled": len(changed),
                         "relabel_precision": float(truth[changed].mean()) if len(changed) else None,
                         "dropped": int(len(plan.drop))}
        log(f"{name:36s} relabelled {len(changed):5d} (precision {results[name]['relabel_precision'] or 0:.3f}) "
            f"dropped {len(plan.drop):5d}  validation accuracy {acc.mean():.4f} +- {acc.std():.4f}")
    (out / "validation.json").write_text(json.dumps({"n_train": len(train), "n_validation": len(val), "seeds": seeds,
                                                     "tools": rows, "rules": results}, indent=2, default=float))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/audit-label-noise")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="Which labels are flipped.")
    ap.add_argument("--repair-seeds", default="0,1,2", help="Training seeds of every repaired model.")
    ap.add_argument("--skip-repair", action="store_true", help="Only the detection figures.")
    ap.add_argument("--validation", action="store_true",
                    help="Choose the repair rule: hold out 10%% of the train split and score each rule there.")
    ap.add_argument("--rules", default="", help="With --validation: only the rules whose names match this regex.")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print
    clean = load_dataset(FMNIST, split="train")
    test = load_dataset(FMNIST, split="test")
    train, truth = noisy(clean, args.noise, seed=args.seed)
    if args.validation:
        # Choosing a repair rule: 10% of the (noisy) train split is held out and scored on its
        # true labels; the test split is not read.
        rest, held = carve(train, 0.1, seed=0)
        val = subset(clean, held, "label-noise-val")
        clean, train, truth = subset(clean, rest, "label-noise-rest"), subset(train, rest, "rest"), truth[rest]
    log(f"train {len(train)}, {truth.sum()} labels flipped")
    t0 = time.perf_counter()
    fold_of, specs = fold_models(train, args.folds, log)
    log(f"{args.folds} fold models: {time.perf_counter() - t0:.0f} s")

    n, k = len(train), train.num_classes
    probs = np.zeros((n, k), np.float32)
    predicted, l2, score, gap, rel = np.zeros(n, np.int64), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    t_flip = 0.0
    for f, spec in enumerate(specs):
        held = np.flatnonzero(fold_of == f)
        net = load_model(spec, k).module.eval()
        with torch.no_grad():
            for s in range(0, len(held), 1000):
                x = torch.from_numpy(np.asarray(train.images[held[s:s + 1000]])).float().div(255).permute(0, 3, 1, 2)
                probs[held[s:s + 1000]] = torch.softmax(net(x), 1).numpy()
        t0 = time.perf_counter()
        ev = label_evidence(net, np.asarray(train.images[held]), train.labels[held], k)
        t_flip += time.perf_counter() - t0
        predicted[held], l2[held], score[held], gap[held], rel[held] = ev.predicted, ev.l2, ev.score, ev.gap, ev.relative
    # The flag: at least the median L2 of the disagreements, over all folds.
    rel = relative_scores(train.labels, predicted, l2, gap)
    ev = LabelEvidence(predicted, l2, score, rel, gap)
    flagged = (ev.predicted != train.labels) & (ev.relative >= 1.0)

    import cleanlab
    from cleanlab.classification import CleanLearning
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    t0 = time.perf_counter()
    issues = find_label_issues(train.labels, probs)
    t_clean = time.perf_counter() - t0
    disagree = ev.predicted != train.labels
    # The product ranks by the raw L2 (chosen on the --seed 1 draw); the ratio is shown too.
    tools = {"flipback audit (minimal: L2 toward the label)": (flagged, ev.score, t_flip),
             "flipback, ranked by L2 over the label's median": (
                 flagged, relative_scores(train.labels, predicted, l2, gap, by_label=True), t_flip)}
    # cleanlab's three ranking methods, each with its default issue filter (prune_by_noise_rate)
    for method in ("self_confidence", "normalized_margin", "confidence_weighted_entropy"):
        quality = get_label_quality_scores(train.labels, probs, method=method)
        tools[f"cleanlab {cleanlab.__version__} ({method})"] = (issues, 1 - quality, t_clean)
    quality = get_label_quality_scores(train.labels, probs)
    tools["fold model disagrees (reference)"] = (disagree, disagree.astype(float) + 1e-3 * (1 - quality), 0.0)
    np.savez_compressed(out / "scores.npz", truth=truth, labels=train.labels, predicted=ev.predicted, l2=ev.l2,
                        flipback=ev.score, cleanlab_quality=get_label_quality_scores(train.labels, probs),
                        cleanlab_issues=issues)
    rows = {}
    for name, (f, s, sec) in tools.items():
        rows[name] = {"flagged": int(f.sum()), "precision": float(precision_score(truth, f, zero_division=0)),
                      "recall": float(recall_score(truth, f)), "auprc": float(average_precision_score(truth, s)),
                      "seconds": sec}
        log(f"{name:45s} flagged {f.sum():5d}  P {rows[name]['precision']:.3f}  R {rows[name]['recall']:.3f}  "
            f"AUPRC {rows[name]['auprc']:.3f}  {sec:.0f} s")

    if args.validation:
        choose_rule(train, clean, val, truth, ev, [int(v) for v in args.repair_seeds.split(",")], out, rows, log,
                    args.rules)
        return
    if args.skip_repair:
        (out / "summary.json").write_text(json.dumps({"n_train": n, "n_flipped": int(truth.sum()), "seed": args.seed,
                                                      "tools": rows}, indent=2, default=float))
        return
    # One training run per configuration and seed: the seed sets the initial weights and the
    # batch order, and the spread over seeds says which differences are noise.
    seeds = [int(v) for v in args.repair_seeds.split(",")]
    relabel = {int(i): int(ev.predicted[i]) for i in np.flatnonzero(flagged)}
    configs = {"noisy labels": (train, RepairPlan()), "clean labels (reference)": (clean, RepairPlan()),
               "flipback soft relabel": (train, RepairPlan(relabel=relabel, relabel_weight=RELABEL_WEIGHT)),
               "flipback hard relabel": (train, RepairPlan(relabel=relabel)),
               "flipback drop": (train, RepairPlan(drop=np.flatnonzero(flagged))),
               **oracle_plans(train, clean, truth, disagree, flagged)}
    repair = {}
    for name, (data, plan) in configs.items():
        runs = [evaluate(retrain(data, plan, name=name.split()[-1].strip(":,"), seed=sd, show_progress=False, log=log),
                         test)
                for sd in seeds]
        repair[name] = {"accuracy": [r["accuracy"] for r in runs], "runs": runs}
    runs = []
    for sd in seeds:
        cl = CleanLearning(SmallCNN(train.classes, tag=f"{train.fingerprint[:40]}-cleanlearning", seed=sd), seed=0)
        cl.fit(np.asarray(train.images), train.labels, label_issues=issues)
        runs.append(evaluate(cl.clf.spec_, test))
    repair["cleanlab CleanLearning"] = {"accuracy": [r["accuracy"] for r in runs], "runs": runs}
    for name, r in repair.items():
        acc = np.array(r["accuracy"])
        log(f"{name:30s} test accuracy {acc.mean():.4f} +- {acc.std():.4f}  ({', '.join(f'{a:.4f}' for a in acc)})")
    (out / "summary.json").write_text(json.dumps({"n_train": n, "n_flipped": int(truth.sum()), "folds": args.folds,
                                                  "tools": rows, "repair": repair}, indent=2, default=float))


if __name__ == "__main__":
    main()
