"""Choose black-box `fast`'s --confidence on errors of train images, never the test ones
(issue 12's 224-px benchmark, after `lite0_bench.py --part black`).

    python benchmarks/lite0_confidence.py --data ../shared/data/cifar10-jpeg --out runs/lite0-bench \\
        --surrogate runs/lite0-bench/SURROGATE.pt [--first 500] [--per-class 50] [--confidences 4,8,16] [--limit 30] \\
        [--patience N]

The validation images are train images --first .. --first + --per-class of each class (sorted
names): past the ones the surrogate learnt from (`--train-per-class`, 500 for the 5,000-answer
surrogate). Each confidence explains the first --limit errors of Lite0 there with black-box
`fast`; prints one JSON line per confidence (success, mean queries, median L2, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flipback.runs.explain_run import ExplainConfig, run_explain

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
                     + (f"-patience{args.patience}" if args.patience else ""))
        s = run_explain(cfg, run, show_progress=False, log=lambda m: None)
        figures = {k: s.get(k) for k in ("n_explained", "success_rate", "mean_queries", "median_l2")}
        print(json.dumps({"confidence": conf, "patience": args.patience, **figures,
                          "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()
