"""Choose black-box `fast`'s --confidence on errors of train images, never the test ones
(issue 12's 224-px benchmark, after `lite0_bench.py --part black`).

    python benchmarks/lite0_confidence.py --data ../shared/data/cifar10-jpeg --out runs/lite0-bench \\
        --surrogate runs/lite0-bench/SURROGATE.pt [--first 500] [--per-class 50] [--confidences 4,8,16] [--limit 30] \\
        [--patience N] [--tag=-NAME] [--budgets 5,10]

The validation images are train images --first .. --first + --per-class of each class (sorted
names): past the ones the surrogate learnt from (`--train-per-class`, 500 for the 5,000-answer
surrogate). Each confidence explains the first --limit errors of Lite0 there with black-box
`fast`; prints one JSON line per confidence (success, mean queries, median L2, seconds).

`--budgets` adds, per confidence, what each smaller per-image query budget (`--budget`) would
have given on the same errors, read from the run's records: exact, because `fast`'s schedule
does not depend on the budget (an image stops at its budget, nothing before it changes), so an
image is corrected within B queries if and only if its record says so in <= B, and it spends
min(its queries, B).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from flipback.runs.explain_run import ExplainConfig, run_explain
from flipback.store.runstore import RunStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lite0_bench import subset  # noqa: E402  (the benchmark's own linked class folders)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="CIFAR-10 JPEG root with train/")
    ap.add_argument("--out", type=Path, default=Path("runs/lite0-bench"))
    ap.add_argument("--surrogate", type=Path, required=True)
    ap.add_argument("--first", type=int, default=500)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--confidences", default="4,8,16")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--patience", type=int, default=None,
                    help="fast's rounds without the surrogate's margin rising before an image is given up")
    ap.add_argument("--tag", default="", help="appended to each run folder's name (one per surrogate)")
    ap.add_argument("--budgets", default="", help="per-image query budgets to read off each run (below its own)")
    args = ap.parse_args()
    out = args.out.resolve()
    val = subset(args.data / "train", out / f"trainval-{args.first}-{args.per_class}", args.per_class, args.first)
    for conf in (float(c) for c in args.confidences.split(",")):
        cfg = ExplainConfig(model=str(out / "lite0_cifar10_mean.pt2"), data=str(val), mode="black-box",
                            method="fast", limit=args.limit, figures=False, device="cpu", trust_model=True,
                            surrogate=str(args.surrogate.resolve()),
                            options={"confidence": conf, **({"patience": args.patience} if args.patience else {})})
        t0 = time.perf_counter()
        # One folder per validation set and confidence: run_explain resumes a folder it finds.
        run = out / (f"val-{args.first}-{args.per_class}-fast-confidence{conf:g}"
                     + (f"-patience{args.patience}" if args.patience else "") + args.tag)
        s = run_explain(cfg, run, show_progress=False, log=lambda m: None)
        figures = {k: s.get(k) for k in ("n_explained", "success_rate", "mean_queries", "median_l2")}
        print(json.dumps({"surrogate": args.surrogate.name, "confidence": conf, "patience": args.patience, **figures,
                          "seconds": round(time.perf_counter() - t0)}), flush=True)
        if args.budgets:
            with RunStore(run / "results.sqlite") as store:
                records = store.records()
            for b in (int(x) for x in args.budgets.split(",")):
                print(json.dumps({"confidence": conf, "patience": args.patience, **within_budget(records, b)}),
                      flush=True)


def within_budget(records, budget: int) -> dict:
    """The run's figures had each image been given at most `budget` queries (see the docstring)."""
    queries = np.array([r.queries for r in records])
    ok = np.array([r.success for r in records]) & (queries <= budget)
    l2 = [r.l2 for r, k in zip(records, ok) if k]
    return {"budget": budget, "n_explained": len(records), "success_rate": float(ok.mean()),
            "mean_queries": float(np.minimum(queries, budget).mean()),
            "median_l2": float(np.median(l2)) if l2 else None}


if __name__ == "__main__":
    main()
