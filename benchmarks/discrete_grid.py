"""White-box `minimal` on the 8-bit grid: how much does choosing which pixels to take back by
one level (the pruning phase) gain over plain scale-then-round? (issue 13)

    python benchmarks/discrete_grid.py [--split train] [--limit 400] [--out grid.json]   (needs ../shared)

`minimal` finds a float change, then scales it and rounds it to the grid (a bisection on the
scale, `grid_steps` queries), then prunes: the unit steps that buy least margin per unit of
norm (the target's gradient at the corrected point) are taken back while the image stays
corrected, `prune_steps` queries. Rows: the float change itself (not an image, for
reference), scale-then-round alone (prune_steps 0) and 2, 4 and 8 pruning steps, all on the
same errors of the public ResNet-20, and the sweep of phase 2b (DDN's quantized steps from
the 8-bit correction: steps, gamma, alpha) that chose its default, and longer runs of it (30
to 100 steps); `--rows 'descent 10, gamma 0.1'` runs a subset (';' between several). The
default split is the train split's errors: settings are chosen there, never on test images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flipback.attacks import MinimalAttack
from flipback.data import load_dataset
from flipback.runs.errors import predict_dataset, to_tensor
from flipback.targets import WhiteBoxTarget, load_model

MODEL = "cifar_resnet20:../shared/models/cifar10_resnet20.th"
DATA = "../shared/data/cifar10-jpeg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="train")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rows", default="", help="only the settings whose name contains one of these (separated by ';')")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ds = load_dataset(DATA, split=args.split)
    target = WhiteBoxTarget(load_model(MODEL, 10).module, 10)
    idx = predict_dataset(lambda b: target.predict(b, counted=False), ds, show_progress=False).misclassified
    idx = idx[:: max(1, len(idx) // args.limit)][: args.limit]  # spread over the split, not one class
    x, y = to_tensor(ds.images[idx]), torch.from_numpy(ds.labels[idx])
    # The rows before phase 2b existed keep descent_steps=0, so they measure what they did.
    settings = {"float change (reference, not an image)": dict(pixels="float", prune_steps=0),
                "scale-then-round only (prune 0)": dict(prune_steps=0, descent_steps=0),
                "scale-then-round + prune 2 (the default before phase 2b)": dict(prune_steps=2, descent_steps=0),
                "scale-then-round + prune 4": dict(prune_steps=4, descent_steps=0),
                "scale-then-round + prune 8": dict(prune_steps=8, descent_steps=0),
                "unit steps (grid=steps), prune 0": dict(grid="steps", prune_steps=0, descent_steps=0),
                "unit steps (grid=steps) + prune 2": dict(grid="steps", prune_steps=2, descent_steps=0),
                "both (grid=both) + prune 2": dict(grid="both", prune_steps=2, descent_steps=0)}
    # DDN's quantized steps from the 8-bit correction (descent_steps), then prune 2: the sweep
    # that chose the default (10 steps, gamma 0.1, alpha 3.0), on this split only.
    for k in (10, 20):
        for gamma in (0.02, 0.05, 0.1, 0.2):
            for alpha in (0.3, 1.0, 3.0, 10.0, 30.0):
                settings[f"descent {k}, gamma {gamma}, alpha {alpha} + prune 2"] = dict(
                    descent_steps=k, descent_gamma=gamma, descent_alpha=alpha, prune_steps=2)
    # Longer phase 2b (issue 13: does it close the gap to DDN-1000 quantized?), the budget
    # raised so that the steps and the pruning fit: `--rows 'descent 30;descent 60;descent 100'`.
    for k in (30, 60, 100):
        for gamma in (0.05, 0.02):
            for alpha in (3.0, 10.0):
                settings[f"descent {k}, gamma {gamma}, alpha {alpha} + prune 2"] = dict(
                    descent_steps=k, descent_gamma=gamma, descent_alpha=alpha, prune_steps=2, max_queries=k + 40)
    if args.rows:
        settings = {k: v for k, v in settings.items() if any(r in k for r in args.rows.split(";"))}
    rows = []
    print(f"{len(idx)} errors of the {args.split} split")
    print("| setting | success | mean queries | median L2 | median L0 (values changed) | seconds |")
    print("|---|---|---|---|---|---|")
    for name, kw in settings.items():
        t0 = time.perf_counter()
        parts = [MinimalAttack(**kw).run(target, target, x[i:i + 256], y[i:i + 256], torch.arange(i, min(i + 256, len(x))))
                 for i in range(0, len(x), 256)]
        secs = time.perf_counter() - t0
        ok = torch.cat([p.success for p in parts])
        corrected = torch.cat([p.corrected for p in parts])
        queries = torch.cat([p.queries for p in parts]).float()
        delta = (corrected - x).flatten(1)
        l2, l0 = delta.norm(dim=1)[ok], (delta.abs() > 0.5 / 255).sum(1)[ok].float()
        row = {"setting": name, "success": float(ok.float().mean()), "mean_queries": float(queries.mean()),
               "median_l2": float(l2.median()), "median_l0": float(l0.median()), "seconds": secs}
        rows.append(row)
        print(f"| {name} | {row['success']:.2%} | {row['mean_queries']:.2f} | {row['median_l2']:.4f} | "
              f"{row['median_l0']:.0f} | {secs:.1f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"split": args.split, "n": len(idx), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
