"""Per-image figures: the earlier matplotlib `save_figure` against the Pillow one, side by side.

    python benchmarks/figure_timing.py [--n 200] [--rounds 3] [--old-rev 2831be4]
        [--cli [--cli-only] [--cli-no-old] --limit 200 --model cifar_resnet20:../shared/models/cifar10_resnet20.th
               --data ../shared/data/cifar10-jpeg/test]

Figures per second for 28×28 grey (Fashion-MNIST test images from Debian's package) and
32×32 RGB (CIFAR-10 test JPEGs from ../shared) images, or random images of those shapes
when the data are missing. Each image gets a plausible correction (a small change in one
block), explained by `explain_changes` once, outside the timing. The old function is the
module as it was at ``--old-rev`` (the last commit with matplotlib figures), read with
``git show`` into a temporary module; the new one is the library's. Old and new take turns,
``--rounds`` times, on the same images and into the same folder; the table gives the median
round. The time `explain_changes` takes per image is printed for comparison.

``--cli`` also times the white-box ``minimal`` command on the first ``--limit`` errors, each
run into a fresh folder: with ``--no-figures``, with figures, and with figures at ``--old-rev``
(that commit's whole ``src``, engine included, on PYTHONPATH; only its figure times compare).
For each it gives the wall time, the attack's own seconds per image (``summary.json``, which
leave the figures out) and the time from one figure file to the next inside the run: a batch
writes its figures one after another, so their modification times give the cost of a figure
and a corrected PNG, free of the noise that swamps a difference of wall times.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flipback.explain import explain_changes, save_figure

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
CIFAR = SHARED / "data" / "cifar10-jpeg" / "test"


def load_old(rev: str):
    """The figure module at ``rev``, imported from git history as a stand-alone module."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/flipback/explain/figure.py"],
                         check=True, capture_output=True, text=True).stdout
    if "matplotlib" not in src:
        raise SystemExit(f"src/flipback/explain/figure.py at {rev} does not draw with matplotlib")
    src = src.replace("from .regions import", "from flipback.explain.regions import")
    tmp = Path(tempfile.mkdtemp(prefix="oldfig-")) / "old_figure.py"
    atexit.register(shutil.rmtree, tmp.parent, True)
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("old_figure", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.save_figure


def images(kind: str, n: int):
    """n test images (H, W, C) uint8 and class names; random ones when the data are missing."""
    path, shape = (FMNIST, (28, 28, 1)) if kind == "grey" else (CIFAR, (32, 32, 3))
    try:
        from flipback.data import load_dataset

        ds = load_dataset(path, split="test")
        u8 = np.asarray(ds.images[:n])
        if u8.shape[1:] == shape and len(u8) == n:
            return u8, list(ds.classes), f"first {n} test images of {path}"
    except Exception as exc:  # noqa: BLE001 - the benchmark runs on random images instead
        print(f"({kind}: {path} not usable: {exc}; random images)", file=sys.stderr)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), [f"class {i}" for i in range(10)], f"{n} random images"


def corrections(u8: np.ndarray, seed: int = 0):
    """Originals and corrected images in [0, 1]: each changed by up to ±12/255 in a random 6×6 block."""
    rng = np.random.default_rng(seed)
    x = u8.astype(np.float32) / 255
    xc = x.copy()
    h, w = x.shape[1:3]
    for i in range(len(x)):
        y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
        step = rng.integers(-12, 13, (6, 6, x.shape[3])) / np.float32(255)
        xc[i, y0:y0 + 6, x0:x0 + 6] = np.clip(xc[i, y0:y0 + 6, x0:x0 + 6] + step, 0, 1)
    return x, xc


def one_round(fn, out: Path, x, xc, exps, names, labels) -> float:
    """Figures per second of ``fn`` over all images."""
    k = len(names)
    t = time.perf_counter()
    for i in range(len(x)):
        pb = (labels[i] + 1) % k
        sb = np.full(k, 0.1 / (k - 1), np.float32)
        sb[pb] = 0.9
        sa = sb[::-1].copy()
        fn(out / f"{i:06d}.png", x[i], xc[i], exps[i], class_names=names, true_label=int(labels[i]),
           pred_before=int(pb), pred_after=int(labels[i]), scores_before=sb, scores_after=sa)
    return len(x) / (time.perf_counter() - t)


def time_figures(old_fn, n: int, rounds: int) -> list[dict]:
    rows = []
    for kind in ("grey", "rgb"):
        u8, names, source = images(kind, n)
        x, xc = corrections(u8)
        t = time.perf_counter()
        exps = explain_changes(x, xc)
        explain_s = (time.perf_counter() - t) / len(x)
        labels = np.arange(len(x)) % len(names)
        rates = {"old": [], "new": []}
        sizes = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, fn in (("old", old_fn), ("new", save_figure)):  # warm-up: imports, fonts, caches
                (Path(tmp) / name).mkdir()
                one_round(fn, Path(tmp) / name, x[:3], xc[:3], exps[:3], names, labels)
            for _ in range(rounds):
                for name, fn in (("old", old_fn), ("new", save_figure)):
                    rates[name].append(one_round(fn, Path(tmp) / name, x, xc, exps, names, labels))
            for name in rates:
                files = list((Path(tmp) / name).glob("*.png"))
                sizes[name] = sum(f.stat().st_size for f in files) / len(files)
        old, new = statistics.median(rates["old"]), statistics.median(rates["new"])
        rows.append({"images": f"{x.shape[1]}×{x.shape[2]}×{x.shape[3]}", "source": source,
                     "old_per_s": old, "new_per_s": new, "old_ms": 1000 / old, "new_ms": 1000 / new,
                     "speed_up": new / old, "old_kb": sizes["old"] / 1024, "new_kb": sizes["new"] / 1024,
                     "explain_changes_ms": 1000 * explain_s, "rounds_old": rates["old"], "rounds_new": rates["new"]})
    return rows


def old_tree(rev: str) -> Path:
    """The ``src`` folder of commit ``rev``, unpacked into a temporary folder."""
    dest = Path(tempfile.mkdtemp(prefix="oldsrc-"))
    atexit.register(shutil.rmtree, dest, True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def run_cli(label: str, model: str, data: str, limit: int, extra: list[str], pythonpath: Path | None = None) -> dict:
    """One white-box minimal run into a fresh folder: wall and attack seconds, and the time
    from one figure file to the next inside the run (one batch writes its images one after
    another, so the files' modification times give the cost of a figure and a corrected PNG)."""
    folder = Path(tempfile.mkdtemp(prefix=f"figtime-{label}-"))
    env = os.environ.copy()
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, "-m", "flipback", "--quiet", "--json", "explain", "--method", "minimal",
           "--limit", str(limit), *extra, "--model", model, "--data", data, "--out", str(folder / "run")]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    summary = json.loads((folder / "run" / "summary.json").read_text())
    n = summary["n_explained"]
    out = {"wall_s": wall, "attack_s": summary["seconds"], "n": n, "attack_ms": 1000 * summary["seconds"] / n,
           "figure_ms": None, "command": " ".join(cmd[2:])}
    figs = sorted(f.stat().st_mtime_ns for f in (folder / "run" / "figures").glob("*.png"))
    if len(figs) > 1:
        out["figure_ms"] = (figs[-1] - figs[0]) / 1e6 / (len(figs) - 1)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def time_cli(model: str, data: str, limit: int, old_rev: str | None) -> dict:
    """The white-box minimal command without figures, with figures, and with figures at
    ``old_rev`` (its whole tree, engine included: only its figure times are compared)."""
    runs = {"no_figures": run_cli("no_figures", model, data, limit, ["--no-figures"]),
            "figures": run_cli("figures", model, data, limit, [])}
    if old_rev:
        runs[f"figures_{old_rev}"] = run_cli("old", model, data, limit, [], pythonpath=old_tree(old_rev))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="images per kind and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--old-rev", default="2831be4", help="a commit whose figure.py draws with matplotlib")
    ap.add_argument("--cli", action="store_true", help="also time `flipback explain --method minimal`")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--model", default=f"cifar_resnet20:{SHARED / 'models' / 'cifar10_resnet20.th'}")
    ap.add_argument("--data", default=str(CIFAR))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--cli-only", action="store_true", help="skip the figure functions (with --cli)")
    ap.add_argument("--cli-no-old", action="store_true", help="skip the run at --old-rev (with --cli)")
    args = ap.parse_args()

    rows = [] if args.cli_only else time_figures(load_old(args.old_rev), args.n, args.rounds)
    print("| images | old (matplotlib) | new (Pillow) | speed-up | PNG size old / new | explain_changes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['old_per_s']:.1f} figures/s ({r['old_ms']:.1f} ms) "
              f"| {r['new_per_s']:.1f} figures/s ({r['new_ms']:.1f} ms) | {r['speed_up']:.1f}× "
              f"| {r['old_kb']:.1f} / {r['new_kb']:.1f} KiB | {r['explain_changes_ms']:.2f} ms |")
    result = {"figures": rows}
    if args.cli:
        runs = time_cli(args.model, args.data, args.limit, None if args.cli_no_old else args.old_rev)
        result["cli"] = runs
        print(f"\n| `minimal`, first {args.limit} errors | wall | attack per image | between figures |")
        print("|---|---|---|---|")
        for label, r in runs.items():
            fig = "–" if r["figure_ms"] is None else f"{r['figure_ms']:.1f} ms"
            print(f"| {label} | {r['wall_s']:.1f} s | {r['attack_ms']:.1f} ms | {fig} |")
        print(f"\n  {runs['no_figures']['command']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
