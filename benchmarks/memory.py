"""Peak memory of `flipback explain` on image folders of growing size (issue 6).

    flock /tmp/flipback-heavy.lock .venv/bin/python benchmarks/memory.py --sizes 10000,50000

For each size N it writes (once) a folder of N 28x28 gray PNGs in --root (default
/tmp/flipback-memory), classes 0..9 with the class as a bright stripe, 2% of the labels wrong;
a fixed linear TorchScript model reads the stripes, so exactly the mislabelled images are its
errors (200 of 10,000, 1,000 of 50,000). Then it runs `flipback --quiet explain --method fast
--no-figures` twice in a fresh process each: "cold" decodes the folder into a fresh cache,
"warm" reads that cache into a fresh run folder. Peak RSS is the child's ru_maxrss, read by a
small launcher process (see `run`).
Prints a Markdown table and writes it, with the raw figures, to --root/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NOISE_RATE = 0.02


def make_folder(root: Path, n: int) -> Path:
    folder = root / f"data-{n}"
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(n)
    truth = rng.integers(0, 10, n)
    labels = truth.copy()
    wrong = rng.random(n) < NOISE_RATE
    labels[wrong] = (truth[wrong] + rng.integers(1, 10, int(wrong.sum()))) % 10
    for k in range(10):
        (folder / str(k)).mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 60, (28, 28), dtype=np.uint8)
        img[2 * truth[i] + 4:2 * truth[i] + 6] = 200
        Image.fromarray(img).save(folder / str(labels[i]) / f"{i:06d}.png")
    (folder / ".complete").touch()
    return folder


class Stripes(torch.nn.Module):
    """logit k = mean brightness of stripe k (rows 2k+4, 2k+5)."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(10, 28, 28)
        for k in range(10):
            w[k, 2 * k + 4:2 * k + 6] = 1 / 56
        self.register_buffer("w", w.reshape(10, 784) * 20)

    def forward(self, x):
        return x.flatten(1) @ self.w.t()


# Linux keeps a process's peak RSS across exec: a child started straight from this process
# (fork or vfork, then exec) reports at least this process's own peak, torch and all. So a small
# Python launcher starts the command and reads its peak with wait4; the launcher's own size
# (about 14 MiB) is then the floor of the figure, not this process's.
# It writes "peak_kib exit_code" (a child killed by signal N has exit code -N, as in subprocess).
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run(cmd: list[str], env: dict | None = None, log: Path | None = None) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS in bytes) of a child process; its output goes to `log`
    (stdout and stderr together) when given, else stderr is shown if it fails."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else None
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", LAUNCHER, str(peak_file), *cmd], env=env,
                                    stdout=out or subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT if out else subprocess.PIPE)
            _, err_text = proc.communicate()
        finally:
            if out:
                out.close()
        seconds = time.perf_counter() - t0
        err = f"see {log}" if log else err_text.decode(errors="replace")
        if proc.returncode != 0 or not peak_file.exists():  # the launcher itself failed
            sys.exit(f"the launcher failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
        peak_kib, code = (int(v) for v in peak_file.read_text().split())  # ru_maxrss is in KiB on Linux
        if code != 0:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            sys.exit(f"failed ({how}): {' '.join(cmd)}\n{err}")
    return code, seconds, peak_kib * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,50000")
    ap.add_argument("--root", type=Path, default=Path("/tmp/flipback-memory"))
    a = ap.parse_args()
    a.root.mkdir(parents=True, exist_ok=True)
    model = a.root / "stripes.pt"
    torch.jit.script(Stripes()).save(str(model))
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        folder = make_folder(a.root, n)
        cache = a.root / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "FLIPBACK_CACHE": str(cache)}
        for phase in ("cold", "warm"):
            out = a.root / f"run-{n}-{phase}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "flipback", "--quiet", "explain", "--model", str(model), "--data",
                   str(folder), "--out", str(out), "--method", "fast", "--no-figures"]
            _, seconds, rss = run(cmd, env)
            s = json.loads((out / "summary.json").read_text())
            rows.append({"images": n, "phase": phase, "errors_explained": s["n_explained"],
                         "corrected": s["n_corrected"], "peak_rss_mib": round(rss / 2**20, 1),
                         "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
    machine = f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    (a.root / "memory.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\n{machine}\n")
    print("| images | run | errors explained | corrected | peak RSS (MiB) | wall time (s) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']:,} | {r['phase']} | {r['errors_explained']:,} | {r['corrected']:,} | "
              f"{r['peak_rss_mib']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
