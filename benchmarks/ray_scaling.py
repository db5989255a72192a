"""Ray scaling: images/s of one explain run with one and with two Ray actors, against the
single process, the driver's overhead per image, the store's write rate and the accountant's
call rate (docs/benchmarks.md, "Past one machine (Ray)").

    flock /tmp/heavy.lock .venv/bin/python benchmarks/ray_scaling.py \\
        --model cifar_resnet20:../shared/models/cifar10_resnet20.th --data ../shared/data/cifar10-jpeg/test \\
        --limit 240 --batch-size 8 --out /tmp/ray-bench

Every configuration explains the same errors (the first --limit of the data set) into its own
run folder, with `--ray local` (a fresh one-machine cluster, 1 CPU per actor) for the Ray
ones. images/s is over the explaining phase only (after the data set is loaded, the actors
started and the errors found), measured the same way for every configuration; whether the
records and corrected images of every configuration equal the first one's is reported per
configuration. Then, without a model: the store's commit rate (RunStore.add, synthetic
CIFAR-10- and ImageNet-sized records, in the run's batch size and in large batches) and the
accountant actor's call rate (one caller waiting for each answer, and many calls in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from flipback.runs import distributed, explain_run
from flipback.runs.distributed import RayOptions
from flipback.runs.explain_run import ExplainConfig, run_explain
from flipback.store import ImageRecord, RunStore

PHASE: dict = {}


def _timed_progress(original):
    """progress_bar, also noting when the explaining bar opens and closes."""

    @contextmanager
    def bar(description, total, **kw):
        with original(description, total, **kw) as advance:
            if description.startswith("explaining"):
                PHASE["start"] = time.perf_counter()
            yield advance
            if description.startswith("explaining"):
                PHASE["end"] = time.perf_counter()

    return bar


explain_run.progress_bar = _timed_progress(explain_run.progress_bar)
distributed.progress_bar = _timed_progress(distributed.progress_bar)


def _records(out: Path) -> list:
    con = sqlite3.connect(out / "results.sqlite")
    try:
        return con.execute("SELECT idx, record, corrected FROM results ORDER BY idx").fetchall()
    finally:
        con.close()


def _one(name: str, folder: str, cfg: ExplainConfig, out: Path, ray: RayOptions | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    PHASE.clear()
    t0 = time.perf_counter()
    summary = run_explain(cfg, out / folder, show_progress=False, resume=False, log=lambda m: None, ray=ray)
    total = time.perf_counter() - t0
    n = summary["n_explained"]
    phase = PHASE["end"] - PHASE["start"]
    row = {"config": name, "folder": folder, "images": n, "explain_seconds": round(phase, 2), "images_per_second": round(n / phase, 3),
           "total_seconds": round(total, 1)}
    if ray is not None:
        r = summary["ray"]
        row.update({k: r[k] for k in ("actors", "driver_seconds_per_image", "driver_cpu_seconds_per_image",
                                      "store_seconds_per_image")})
    print(json.dumps(row), flush=True)
    return row


def store_rate(out: Path, shape=(32, 32, 3), n: int = 2048, batch: int = 256) -> float:
    """Images/s that RunStore.add commits: synthetic records like CIFAR-10's, `batch` per commit
    (the driver commits one explained batch at a time)."""
    rng = np.random.default_rng(0)
    rec = ImageRecord(index=0, name="cat/0000.jpg", true=3, pred_before=5, pred_after=3, true_name="cat",
                      pred_before_name="dog", pred_after_name="cat", success=True, queries=2, l2=0.03, linf=0.01,
                      l0=40, frac_changed=0.01, regions=[{"share": 0.5, "area": 12, "bbox": [1, 2, 3, 4],
                                                          "centroid": [2.0, 3.0]}] * 3, n_regions=3,
                      region_fraction=0.1, scores_before=[0.1] * 10, scores_after=[0.1] * 10,
                      figure="figures/000000.png", corrected_image="corrected/000000.png")
    images = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
    path = out / f"store-{shape[0]}-{batch}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.sqlite").unlink(missing_ok=True)
    with RunStore.open(path, {"bench": True}) as store:
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            recs = [ImageRecord.from_dict({**rec.to_dict(), "index": start + j}) for j in range(batch)]
            store.add(recs, images, images, 1.0)
        return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--method", default="minimal")
    ap.add_argument("--limit", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", default="local-1thread,ray-1,ray-2,ray-2,ray-1,local-2threads",
                    help="local-Nthread(s) (in this process) | ray-N (N actors on a fresh `--ray local`)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ExplainConfig(model=args.model, data=args.data, method=args.method, limit=args.limit,
                        batch_size=args.batch_size, device="cpu")
    rows = []
    for i, name in enumerate(args.configs.split(",")):  # a configuration may come twice: its own folder each
        folder = f"{i}-{name}"
        if name.startswith("local"):
            rows.append(_one(name, folder, cfg, args.out, None, threads=int(name.split("-")[1][0])))
        else:
            rows.append(_one(name, folder, cfg, args.out, RayOptions(address="local", actors=int(name.split("-")[1])),
                             threads=1))
    reference = _records(args.out / rows[0]["folder"])
    for row in rows:
        row["records_identical_to_first"] = _records(args.out / row["folder"]) == reference
    rates: dict = {}
    for r in rows:
        rates.setdefault(r["config"], []).append(r["images_per_second"])
    result = {"machine": machine(), "command": " ".join(sys.argv), "rows": rows,
              "images_per_second_mean": {k: round(sum(v) / len(v), 3) for k, v in rates.items()}}
    if "ray-1" in rates and "ray-2" in rates:
        mean = result["images_per_second_mean"]
        result["speedup_2_over_1_actor"] = round(mean["ray-2"] / mean["ray-1"], 3)
    print(json.dumps(result, indent=1), flush=True)
    result["store_images_per_second"] = {
        f"32x32x3, {args.batch_size} a commit": round(store_rate(args.out, batch=args.batch_size, n=1024)),
        "32x32x3, 256 a commit": round(store_rate(args.out)),
        f"224x224x3, {args.batch_size} a commit": round(store_rate(args.out, (224, 224, 3), n=256, batch=args.batch_size)),
        "224x224x3, 64 a commit": round(store_rate(args.out, (224, 224, 3), n=512, batch=64))}
    result["accountant_calls_per_second"] = accountant_rate()
    print(json.dumps({k: result[k] for k in ("store_images_per_second", "accountant_calls_per_second")}, indent=1))
    (args.out / "ray_scaling.json").write_text(json.dumps(result, indent=1))


def machine() -> dict:
    import platform

    import ray

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "memory_gib": round(mem, 1), "cuda": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def accountant_rate(n: int = 2000) -> dict:
    """Calls/s the run's one QueryAccountant actor answers (lease, as an actor with a total budget
    makes them): one caller waiting for each answer, and `n` calls in flight at once."""
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        acct = ray.remote(distributed.QueryAccountant).options(num_cpus=0).remote(10**12)
        ray.get([acct.lease.remote("warm", 1) for _ in range(100)])
        t0 = time.perf_counter()
        for i in range(n // 4):
            ray.get(acct.lease.remote(f"a{i}", 64))
        one = (n // 4) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray.get([acct.lease.remote(f"b{i}", 64) for i in range(n)])
        many = n / (time.perf_counter() - t0)
        return {"one_caller_waiting": round(one), "calls_in_flight": round(many)}
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
