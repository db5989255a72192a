"""Audit and repair on real CIFAR-10, no planted truth (issue 15, benchmark 3).

    python benchmarks/audit_cifar.py [--out DIR] [--seeds 0,1,2] [--plans control,cleanlab]   (needs ../shared)

- 10% of CIFAR-10's train split (5,000 images, per class, seeded) is carved out as validation.
- Model A: the public ResNet-20 fine-tuned on the other 45,000 by the project's recipe
  (runs/planted.py: 2 epochs of SGD with flips over a 20,000-image subset). Note: that public
  checkpoint was trained on all 50,000 train images, validation ones included; nothing
  here can undo that.
- flipback audit of A: its validation errors corrected (white-box `minimal`), recurring causes,
  and label evidence on the 45,000 (in sample: no fold models at this size on 2 cores).
- Then A is fine-tuned once more by the same recipe (same steps), once per seed of `--seeds`, on:
  - the 45,000 as they are (no repair);
  - the 45,000 without the likely wrong labels (flipback drop);
  - controls for that drop: as many images dropped at random, and cleanlab's label issues
    (find_label_issues on model A's probabilities, in sample like flipback's evidence) dropped;
  - the 45,000 plus the validation errors with their true labels (same data, no flipback);
  - the 45,000 plus flipback's corrections of those errors with their true labels.
Test accuracy and the most common confusion pairs of each, on the untouched test split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from flipback.audit import audit
from flipback.audit.labels import correct
from flipback.audit.split import carve, subset
from flipback.data import load_dataset
from flipback.runs.planted import _train
from flipback.runs.repair import RepairPlan, evaluate, retrain
from flipback.runs.train import model_cache_dir
from flipback.targets.loading import load_model

SPEC = "cifar_resnet20:../shared/models/cifar10_resnet20.th"
DATA = "../shared/data/cifar10-jpeg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/audit-cifar")
    ap.add_argument("--seeds", default="0,1,2", help="Seeds of every fine-tune (batch order and flips).")
    ap.add_argument("--plans", default="", help="Run only the plans whose names start with one of these "
                    "(comma-separated, e.g. 'control,cleanlab'); all by default.")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print
    full = load_dataset(DATA, split="train")
    test = load_dataset(DATA, split="test")
    tr_rows, val_rows = carve(full, 0.1, seed=0)
    train, val = subset(full, tr_rows, "carve-train"), subset(full, val_rows, "carve-val")
    t0 = time.perf_counter()
    spec_a = _train(SPEC, train, model_cache_dir() / "audit" / f"resnet20-A-{train.fingerprint[:40]}.th", False, log)
    log(f"model A: {time.perf_counter() - t0:.0f} s")
    net = load_model(spec_a, 10).module.eval()
    t0 = time.perf_counter()
    c = correct(net, np.asarray(val.images), val.labels, 10)
    wrong = np.flatnonzero((c.predicted != val.labels) & c.success)
    log(f"validation: {int((c.predicted != val.labels).sum())} errors, {len(wrong)} corrected, "
        f"{time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    result = audit(net, np.asarray(train.images), train.labels, train.classes, names=train.names,
                   originals=np.asarray(val.images)[wrong], corrected=c.corrected[wrong], true=val.labels[wrong],
                   pred=c.predicted[wrong], validation_images=np.asarray(val.images), validation_pred=c.predicted)
    seconds = time.perf_counter() - t0
    result.to_csv(out / "suspects.csv")
    label_suspects = result.flagged("label")
    log(f"audit {seconds:.0f} s: {result.stats}")
    errors_x, errors_y = np.asarray(val.images)[wrong], val.labels[wrong]
    import cleanlab
    from cleanlab.filter import find_label_issues

    from flipback.runs.errors import to_tensor

    with torch.no_grad():
        probs = torch.cat([torch.softmax(net(to_tensor(np.asarray(train.images[i:i + 1000]))), 1)
                           for i in range(0, len(train), 1000)]).numpy()
    cleanlab_issues = np.flatnonzero(find_label_issues(train.labels, probs))
    at_random = np.sort(np.random.default_rng(0).choice(len(train), len(label_suspects), replace=False))
    log(f"cleanlab {cleanlab.__version__}: {len(cleanlab_issues)} label issues "
        f"({len(np.intersect1d(cleanlab_issues, label_suspects))} of them among flipback's {len(label_suspects)})")
    plans = {
        "fine-tune, no repair": RepairPlan(),
        "flipback: drop likely wrong labels": RepairPlan(drop=label_suspects),
        "control: drop as many at random": RepairPlan(drop=at_random),
        f"cleanlab {cleanlab.__version__}: drop its label issues": RepairPlan(drop=cleanlab_issues),
        "validation errors added (no flipback)": RepairPlan(extra_images=errors_x, extra_labels=errors_y),
        "flipback corrections of them added": RepairPlan(extra_images=c.corrected[wrong], extra_labels=errors_y),
    }
    if args.plans:
        wanted = tuple(p.strip() for p in args.plans.split(",") if p.strip())
        plans = {name: plan for name, plan in plans.items() if name.startswith(wanted)}
    results = {"model A": evaluate(spec_a, test)}
    seeds = [int(v) for v in args.seeds.split(",")]
    for name, plan in plans.items():
        runs = []
        for sd in seeds:
            t0 = time.perf_counter()
            spec = retrain(train, plan, base=spec_a, name=name.split()[0].strip(",:"), seed=sd, show_progress=False,
                           log=log)
            runs.append({**evaluate(spec, test), "seconds": time.perf_counter() - t0})
        results[name] = {"accuracy": [r["accuracy"] for r in runs], "plan": plan.describe(), "runs": runs}
    for name, r in results.items():
        acc = np.array(r["accuracy"], ndmin=1)
        log(f"{name:42s} test accuracy {acc.mean():.4f} +- {acc.std():.4f}  ({', '.join(f'{a:.4f}' for a in acc)})")
    (out / "summary.json").write_text(json.dumps({
        "n_train": len(train), "n_validation": len(val), "validation_errors": int((c.predicted != val.labels).sum()),
        "corrected": int(len(wrong)), "audit": result.stats, "audit_seconds": seconds,
        "cleanlab_issues": int(len(cleanlab_issues)),
        "cleanlab_flipback_overlap": int(len(np.intersect1d(cleanlab_issues, label_suspects))),
        "causes": [{"class": train.classes[k.pred], "support": k.support, "background": k.background}
                   for k in result.causes], "results": results}, indent=2, default=float))


if __name__ == "__main__":
    main()
