"""flipback's `minimal` attack side by side with Foolbox 3's DDN and FMN-L2 (stock and
fixed), all targeted at the true label with 100 steps, and with adv-lib's ALMA, APGD
minimum-norm, FMN and DDN at AttackBench's settings (1,000 steps; `--advlib`), on the same
misclassified images.

    python benchmarks/whitebox_minimal.py --model cifar_resnet20:../shared/models/cifar10_resnet20.th \
        --data ../shared/data/cifar10-jpeg/test [--limit N] [--attacks ddn] \
        [--advlib alma,apgd-min,fmn,ddn,ddn-q] [--offset K] [--out results.json]
    python benchmarks/whitebox_minimal.py --merge part1.json part2.json ... [--out merged.json]

Needs the bench extra (`pip install -e .[bench]`) and, for `--advlib`, adv-lib
(`pip install --no-deps adv-lib==0.2.8`, see advlib_baselines.py). Prints a markdown table for
docs/benchmarks.md, and the issue-13 speed bar: flipback's 8-bit speed against the fastest
anchor whose 8-bit median is within 2% of the best anchor's. Speed is measured in this one
run, attack by attack.

The anchors run at about half an image per second on two CPU cores, so the full set of errors
can be split into runs (`--offset K --limit N`: errors K to K+N-1) whose `--out` files keep each
row's per-image L2 (null where not corrected) and are written after every attack, so a stopped
run keeps what it finished. `--merge` joins such files row by row (the images of the runs must
not overlap) and prints the table of the whole: success and median over all the images, speed
as images over the summed seconds.
"""

from __future__ import annotations

import argparse
import json
import math
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


def _per_image(l2: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in l2.tolist()]


def merge(parts: list[dict]) -> dict:
    """Join runs over disjoint slices of the same errors, row by row (a row is kept only if
    every part has it). Success and median are recomputed from the per-image L2s; speed is all
    the images over all the seconds."""
    parts = sorted(parts, key=lambda p: p["offset"])  # per-image lists in the errors' order
    spans = [(p["offset"], p["offset"] + p["n_images"]) for p in parts]
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise SystemExit(f"runs overlap: one ends at error {end}, the next starts at {start}")
    names = [r["attack"] for r in parts[0]["rows"]]
    rows = []
    for name in names:
        found = [next((r for r in p["rows"] if r["attack"] == name), None) for p in parts]
        if any(f is None for f in found):
            missing = [p["offset"] for p, f in zip(parts, found) if f is None]
            print(f"dropped {name!r}: the runs starting at errors {missing} lack it", file=sys.stderr)
            continue
        l2 = torch.tensor([math.nan if v is None else v for f in found for v in f["l2"]], dtype=torch.float64)
        n = len(l2)
        secs = sum(f["seconds"] for f in found)
        row = {k: v for k, v in found[0].items() if k not in ("l2", "success", "median_l2", "seconds", "images_per_second", "mean_queries")}
        row.update(success=float(torch.isfinite(l2).double().mean()), median_l2=_med(l2),
                   mean_queries=sum(f["mean_queries"] * len(f["l2"]) for f in found) / n,
                   seconds=secs, images_per_second=n / secs, l2=_per_image(l2))
        rows.append(row)
    gaps = [f"{a}-{b}" for (_, a), (b, _) in zip(spans, spans[1:]) if b > a]
    return {"n_images": sum(p["n_images"] for p in parts), "offset": spans[0][0], "gaps": gaps,
            "rows": rows, "speed_bar": speed_bar(rows)}


def paired_median(rows: list[dict], row: dict) -> float | None:
    """flipback `minimal`'s median L2 (same pixel kind) on the images `row` corrected: an
    anchor that misses some images has its median taken over easier ones, this evens that."""
    own = next((r for r in rows if r["attack"] == f"flipback minimal ({row['pixels']})"), None)
    if own is None or own is row or "l2" not in own or "l2" not in row:
        return None
    both = torch.tensor([a for a, b in zip(own["l2"], row["l2"]) if a is not None and b is not None], dtype=torch.float64)
    return _med(both)


def print_table(result: dict) -> None:
    rows = result["rows"]
    ddn = next((r for r in rows if r["attack"].startswith("foolbox ddn") and r["pixels"] == "float"), None)
    print(f"{result['n_images']} misclassified images from error {result['offset']}, {torch.get_num_threads()} threads\n")
    if result.get("gaps"):
        print(f"NOT CONTIGUOUS: errors {', '.join(result['gaps'])} are in no run\n")
    print("| attack | pixels | success | median L2 | flipback's median on the same images | queries/image | img/s "
          "| speed vs Foolbox DDN |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['images_per_second'] / ddn['images_per_second']:.1f}x" if ddn else ""
        paired = paired_median(rows, r)
        print(f"| {r['attack']} | {r['pixels']} | {r['success']:.2%} | {r['median_l2']:.4f} | "
              f"{'' if paired is None else f'{paired:.4f}'} | {r['mean_queries']:.1f} | {r['images_per_second']:.2f} | {ratio} |")
    bar = result["speed_bar"]
    if bar:
        print(f"\nAnchors on 8-bit images (best of rounded / scale-then-round, 100% success): best median "
              f"{bar['best_median']:.4f}; within 2% of it: {', '.join(bar['within_2pct'])}; fastest of those: "
              f"{bar['fastest']} at {bar['fastest_ips']:.2f} img/s. flipback minimal (uint8): median "
              f"{bar['flipback_median']:.4f} at {bar['speed_ratio']:.1f}x that speed.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--limit", type=int, default=None, help="first N misclassified images (after --offset)")
    ap.add_argument("--offset", type=int, default=0, help="skip the first K misclassified images")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="join earlier --out files instead of running")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--attacks", default="ddn,fmn,fmn-fixed", help="Foolbox attacks ('' for none)")
    ap.add_argument("--advlib", default="", help="adv-lib attacks, e.g. alma,apgd-min,fmn,ddn,ddn-q")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.merge:
        result = merge([json.loads(p.read_text()) for p in args.merge])
        print_table(result)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return
    if not (args.model and args.data):
        ap.error("--model and --data are needed unless --merge is given")

    ds = load_dataset(args.data)
    model = load_model(args.model, ds.num_classes).module
    target = WhiteBoxTarget(model, ds.num_classes)
    idx = predict_dataset(lambda b: target.predict(b, counted=False), ds, show_progress=False).misclassified
    idx = idx[args.offset:][: args.limit]
    x, y = to_tensor(ds.images[idx]), torch.from_numpy(ds.labels[idx])
    rows = []

    def result() -> dict:
        return {"n_images": len(x), "offset": args.offset, "rows": rows, "speed_bar": speed_bar(rows)}

    def save() -> None:  # after every attack: a stopped run keeps what it finished
        if args.out:
            args.out.write_text(json.dumps(result(), indent=1))

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
                     "images_per_second": len(x) / secs, "l2": _per_image(l2)})
    save()

    def anchor_rows(label: str, res: dict, queries: float) -> None:
        common = {"mean_queries": queries, "seconds": res["seconds"], "images_per_second": res["images_per_second"],
                  "anchor": label}
        for kind, pixels, how in (("float", "float", " (float)"), ("uint8", "uint8", ", rounded to 8 bits"),
                                  ("scaled", "uint8", ", scale-then-round")):
            rows.append({"attack": label + how, "pixels": pixels, "judged": kind,
                         "success": float(res[f"success_{kind}"].float().mean()),
                         "median_l2": _med(res[f"l2_{kind}"]), "l2": _per_image(res[f"l2_{kind}"]), **common})
        save()

    for name in filter(None, args.attacks.split(",")):
        anchor_rows(f"foolbox {name}-{args.steps}", run_foolbox(model, x, y, name, steps=args.steps), float(args.steps))
    if args.advlib:
        from advlib_baselines import GRADIENTS, run_advlib
        for name in args.advlib.split(","):
            anchor_rows(f"adv-lib {name}", run_advlib(model, x, y, name), float(GRADIENTS[name]))

    print_table(result())  # (each attack's rows were saved as it finished)


def speed_bar(rows: list[dict]) -> dict | None:
    """Issue 13's bar: flipback's 8-bit speed against the fastest anchor that comes within 2% of
    the best 8-bit median. An anchor counts on 8-bit images only where it corrects every image
    (rounded or scale-then-round, whichever of the two has the smaller median)."""
    own = next((r for r in rows if r["attack"] == "flipback minimal (uint8)"), None)
    best: dict[str, dict] = {}
    for r in rows:
        if "anchor" in r and r["pixels"] == "uint8" and r["success"] == 1.0:
            if r["anchor"] not in best or r["median_l2"] < best[r["anchor"]]["median_l2"]:
                best[r["anchor"]] = r
    if own is None or not best:
        return None
    top = min(r["median_l2"] for r in best.values())
    close = [r for r in best.values() if r["median_l2"] <= 1.02 * top]
    fastest = max(close, key=lambda r: r["images_per_second"])
    return {"best_median": top, "within_2pct": [r["attack"] for r in close], "fastest": fastest["attack"],
            "fastest_ips": fastest["images_per_second"], "flipback_median": own["median_l2"],
            "speed_ratio": own["images_per_second"] / fastest["images_per_second"]}


if __name__ == "__main__":
    main()
