"""flipback's `minimal` attack side by side with Foolbox 3's DDN and FMN-L2 (stock and
fixed), all targeted at the true label with 100 steps, on the same misclassified images.

    python benchmarks/whitebox_minimal.py --model cifar_resnet20:../shared/models/cifar10_resnet20.th \
        --data ../shared/data/cifar10-jpeg/test [--limit N] [--out results.json]

Needs the bench extra (`pip install -e .[bench]`). Prints a markdown table for
docs/benchmarks.md. Speed is measured in this one run, attack by attack.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foolbox_baselines import run_foolbox  # noqa: E402

from flipback.attacks import AttackResult, MinimalAttack  # noqa: E402
from flipback.data import load_dataset  # noqa: E402
from flipback.runs.errors import predict_dataset, to_tensor  # noqa: E402
from flipback.targets import WhiteBoxTarget, load_model  # noqa: E402


def _med(v: torch.Tensor) -> float:
    v = v[torch.isfinite(v)]
    return float(v.median()) if len(v) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N misclassified images")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--attacks", default="ddn,fmn,fmn-fixed")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    ds = load_dataset(args.data)
    model = load_model(args.model, ds.num_classes).module
    target = WhiteBoxTarget(model, ds.num_classes)
    idx = predict_dataset(lambda b: target.predict(b, counted=False), ds, show_progress=False).misclassified[: args.limit]
    x, y = to_tensor(ds.images[idx]), torch.from_numpy(ds.labels[idx])
    rows = []
    for pixels in ("uint8", "float"):
        t0 = time.perf_counter()
        # Batches of 256, as Foolbox's runs below and `flipback explain` use.
        parts = [MinimalAttack(pixels=pixels).run(target, target, x[i:i + 256], y[i:i + 256], torch.arange(i, min(i + 256, len(x)))) for i in range(0, len(x), 256)]
        secs = time.perf_counter() - t0
        r = AttackResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                           ("corrected", "success", "queries", "logits")))
        l2 = (r.corrected - x).flatten(1).norm(dim=1)
        l2[~r.success] = float("nan")
        rows.append({"attack": f"flipback minimal ({pixels})", "pixels": pixels,
                     "success": float(r.success.float().mean()), "median_l2": _med(l2),
                     "mean_queries": float(r.queries.float().mean()), "seconds": secs,
                     "images_per_second": len(x) / secs})
    for name in args.attacks.split(","):
        res = run_foolbox(model, x, y, name, steps=args.steps)
        common = {"mean_queries": float(args.steps), "seconds": res["seconds"],
                  "images_per_second": res["images_per_second"]}
        rows.append({"attack": f"foolbox {name} (float)", "pixels": "float",
                     "success": float(res["success_float"].float().mean()), "median_l2": _med(res["l2_float"]),
                     **common})
        rows.append({"attack": f"foolbox {name}, rounded to 8 bits", "pixels": "uint8",
                     "success": float(res["success_uint8"].float().mean()), "median_l2": _med(res["l2_uint8"]),
                     **common})
        rows.append({"attack": f"foolbox {name}, scale-then-round", "pixels": "uint8",
                     "success": float(res["success_scaled"].float().mean()), "median_l2": _med(res["l2_scaled"]),
                     **common})
    ddn = next((r for r in rows if r["attack"] == "foolbox ddn (float)"), None)
    print(f"{len(x)} misclassified images, {torch.get_num_threads()} threads\n")
    print("| attack | pixels | success | median L2 | queries/image | img/s | speed vs DDN |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["images_per_second"] / ddn["images_per_second"] if ddn else float("nan")
        print(f"| {r['attack']} | {r['pixels']} | {r['success']:.2%} | {r['median_l2']:.4f} | "
              f"{r['mean_queries']:.1f} | {r['images_per_second']:.1f} | {ratio:.1f}x |")
    if args.out:
        args.out.write_text(json.dumps({"n_images": len(x), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
