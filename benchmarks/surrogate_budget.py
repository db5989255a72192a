"""Agreement against budget: what more target answers buy the default surrogate (issue 13).

    python benchmarks/surrogate_budget.py OUT_DIR [--budgets 1000,2000,5000,10000] [--errors 500]
                                                                                       (needs ../shared)

For each budget, `flipback surrogate`'s default ensemble (resnet20 + 2 x cnn32, 30 epochs,
from scores) is trained on the public ResNet-20's answers for that many CIFAR-10 *train*
images (the same seed, so each budget's images contain the smaller budgets' ones), saved to
OUT_DIR/surrogate-BUDGET.th and reused on a rerun. Each row: the agreement with the target on
the surrogate's held-out tenth and on all 10,000 test images, then black-box `fast` (at most
10 queries, as benchmarks/surrogate_ablation.py) on the first `--errors` test errors: success,
mean target queries, share corrected by the first query, median L2 of the verified 8-bit
change. The test images are used only to measure; nothing is chosen on them.

`--self-train N`: each budget's surrogate is trained with self-training instead (`flipback
surrogate --self-train N`: refit on the answers plus N train images never asked about,
labelled by the first surrogate; no queries), saved as surrogate-BUDGET-self-N.th.
`--active A`: the last share A of each budget is chosen actively (`flipback surrogate
--active A`: the images a surrogate fitted to the first answers is least sure about), saved as
surrogate-BUDGET-active-A.th. Both together: both tags.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from surrogate_ablation import fast_black_box  # run as a script: benchmarks/ is on the path

from flipback.data import load_dataset
from flipback.runs.errors import to_tensor
from flipback.runs.faithfulness import _real_images
from flipback.runs.surrogate_run import run_surrogate
from flipback.targets.blackbox import load_blackbox
from flipback.targets.surrogate import agreement, load_surrogate

SPEC = "cifar_resnet20:../shared/models/cifar10_resnet20.th"
DATA = "../shared/data/cifar10-jpeg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--budgets", default="1000,2000,5000,10000")
    ap.add_argument("--errors", type=int, default=500, help="How many of the first test errors `fast` explains.")
    ap.add_argument("--self-train", type=int, default=0, help="Unqueried train images labelled by the surrogate.")
    ap.add_argument("--active", type=float, default=0.0, help="Share of each budget chosen actively.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    _, _, x, y, _, k, _ = _real_images(DATA, SPEC, args.errors, False)
    test = load_dataset(DATA, split="test", progress=False)
    everything = to_tensor(test.images[:])
    rows = []
    tag = (f"-self-{args.self_train}" if args.self_train else "") + (f"-active-{args.active:g}" if args.active else "")
    with load_blackbox(SPEC, k, output="scores") as target:
        target_labels = target.query(everything, counted=False).labels
        print(f"| answers | training | agreement (held out) | agreement (10,000 test images) | success ({len(x)} "
              "errors) | mean queries | corrected by the first query | median L2 |")
        print("|---|---|---|---|---|---|---|---|")
        for budget in (int(b) for b in args.budgets.split(",")):
            path = args.out / f"surrogate-{budget}{tag}.th"
            t0 = time.perf_counter()
            if not path.is_file():
                run_surrogate(target=SPEC, data=f"{DATA}/train", budget=budget, out=path, show_progress=False,
                              device="cpu", log=lambda *a: None, self_train=args.self_train,
                              active=args.active)
            seconds = time.perf_counter() - t0
            surrogate = load_surrogate(path)
            model = surrogate.module.eval()
            agreed = agreement(model, everything, target_labels)
            success, queries, l2 = fast_black_box(target, model, k, x, y)
            row = {"budget": budget, "self_train": args.self_train, "active": args.active, "training_seconds": seconds,
                   "held_out_agreement": surrogate.meta["agreement"],
                   "test_agreement": agreed, "success": float(success.float().mean()),
                   "mean_queries": float(queries.float().mean()),
                   "first_query": float((success & (queries == 1)).float().mean()),
                   "median_l2": float(l2[success].median()) if bool(success.any()) else None}
            rows.append(row)
            name = f"{budget:,}" + (f" + {args.self_train:,} self-labelled" if args.self_train else "") + \
                (f" ({args.active:.0%} chosen actively)" if args.active else "")
            print(f"| {name} | {seconds:.0f} s | {row['held_out_agreement']:.1%} | {agreed:.1%} | "
                  f"{row['success']:.1%} | {row['mean_queries']:.2f} | {row['first_query']:.1%} | "
                  f"{row['median_l2'] or float('nan'):.3f} |", flush=True)
    (args.out / f"budget{tag}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
