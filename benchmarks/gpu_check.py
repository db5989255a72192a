"""CUDA against CPU, for benchmarks/gpu_check.sh.

prepare: the first N errors of a model on a data set, as an .npz (images, labels, classes).
run: every method on those errors on the CPU and on CUDA, with the same command otherwise;
compares the records image by image and writes gpu_check.json and a table to --out.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = {"paper": 200, "fast": 200, "minimal": 200, "regions": 40}


def prepare(args) -> None:
    import torch

    from flipback.data import load_dataset
    from flipback.runs.errors import to_tensor
    from flipback.targets import load_model

    ds = load_dataset(args.data)
    model = load_model(args.model, ds.num_classes).module.eval()
    keep = []
    with torch.no_grad():
        for s in range(0, len(ds), 500):
            idx = np.arange(s, min(len(ds), s + 500))
            pred = model(to_tensor(ds.images[idx])).argmax(1).numpy()
            keep.extend(idx[pred != ds.labels[idx]].tolist())
            if len(keep) >= args.n:
                break
    keep = np.array(keep[: args.n])
    np.savez_compressed(args.out, images=ds.images[keep], labels=ds.labels[keep], classes=np.array(ds.classes))
    print(f"{len(keep)} errors -> {args.out}")


def records(run: Path) -> dict:
    db = sqlite3.connect(run / "results.sqlite")
    out = {}
    for rec, img in db.execute("SELECT record, corrected FROM results"):
        r = json.loads(rec)
        out[r["index"]] = (r, np.frombuffer(img, np.uint8))
    return out


def run(args) -> None:
    out = Path(args.out)
    table, report = [], {}
    for method, limit in METHODS.items():
        rates = {}
        for device in ("cpu", "cuda"):
            folder = out / f"{method}-{device}"
            cmd = [sys.executable, "-m", "flipback", "--quiet", "--json", "explain", "--model", args.model,
                   "--data", args.data, "--method", method, "--device", device, "--limit", str(limit),
                   "--no-figures", "--out", str(folder)]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if res.returncode != 0:
                print(f"{method} on {device} failed:\n{res.stderr[-2000:]}")
                rates[device] = None
                continue
            summary = json.loads((folder / "summary.json").read_text())
            rates[device] = {"success_rate": summary["success_rate"], "mean_queries": summary["mean_queries"],
                             "median_l2": summary["median_l2"], "images_per_second": summary["images_per_second"],
                             "wall_seconds": seconds}
        entry = {"cpu": rates.get("cpu"), "cuda": rates.get("cuda")}
        if rates.get("cpu") and rates.get("cuda"):
            a, b = records(out / f"{method}-cpu"), records(out / f"{method}-cuda")
            same_success = sum(a[i][0]["success"] == b[i][0]["success"] for i in a)
            same_queries = sum(a[i][0]["queries"] == b[i][0]["queries"] for i in a)
            same_bytes = sum(np.array_equal(a[i][1], b[i][1]) for i in a)
            levels = max(int(np.abs(a[i][1].astype(int) - b[i][1].astype(int)).max()) for i in a)
            entry.update(n=len(a), same_success=same_success, same_queries=same_queries, same_bytes=same_bytes,
                         max_level_difference=levels)
            table.append(f"| {method} | {len(a)} | {same_success} | {same_queries} | {same_bytes} | "
                         f"{rates['cpu']['success_rate']:.2%} / {rates['cuda']['success_rate']:.2%} | "
                         f"{rates['cpu']['median_l2']:.4f} / {rates['cuda']['median_l2']:.4f} | "
                         f"{rates['cpu']['images_per_second']:.1f} / {rates['cuda']['images_per_second']:.1f} |")
        report[method] = entry
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    head = ("| method | errors | same success | same queries | same 8-bit image | success cpu / cuda | "
            "median L2 cpu / cuda | img/s cpu / cuda |\n|---|---|---|---|---|---|---|---|")
    print(head + "\n" + "\n".join(table))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("step", choices=("prepare", "run"))
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args()
    prepare(args) if args.step == "prepare" else run(args)


if __name__ == "__main__":
    main()
