"""`flipback bench paper`: each method on every error, side by side with the paper.

Layout: RUN_DIR/<method>/ is a full, resumable explain run with its own summary.json
(all the contract's keys). RUN_DIR/summary.json holds `methods` (one entry per method,
each with those keys), `published` (the paper's figures) and, at top level, the contract's
keys of the `paper` method (the reproduction), or of the first method run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import FlipbackError
from ..report import write_report
from ..targets.device import resolve_device
from ..targets.surrogate import init_specs
from .explain_run import ExplainConfig, run_explain

# Haffar, Jebreel, Domingo-Ferrer, Sanchez, MDAI 2021 (LNCS 12898), as reported.
PAPER = {
    "white-box": {"success_rate": 0.9967, "mean_queries": 1.96},
    "black-box": {"success_rate": 0.7308, "mean_queries": 8.73},
}


def run_bench(*, model: str, data: str, out_dir: Path, mode: str, methods: list[str] | None = None,
              pixels: str = "uint8", limit: int | None = None, figures: bool = False, batch_size: int = 256,
              surrogate: str | None = None, surrogate_data: str | None = None, surrogate_budget: int = 10000,
              output: str = "scores", show_progress: bool = True, log=print, ray=None, device: str = "auto",
              max_memory: str | None = None, surrogate_init: str | list[str] | None = None, classes: str | None = None) -> dict:
    """`classes`: the model's class names, one a line, in its output order (explain's
    --classes); the data set's class folders are matched to them, for the surrogate too."""
    out_dir = Path(out_dir)
    resolve_device(device)  # a device that is not there: one clear error before any work
    if methods is None:
        methods = ["paper", "fast", "minimal"]  # both modes: black-box `minimal` shrinks with target queries
    if mode == "black-box" and surrogate is None and any(spec.startswith("python:")
                                                         for spec in init_specs(surrogate_init)):
        # Loading such a surrogate imports the code it names, which needs --trust-model; bench has none.
        raise FlipbackError("bench cannot start its surrogate from a python: model",
                            hint="export it to a .pt2 or TorchScript file; or train with `flipback surrogate --init` "
                                 "and explain with `flipback explain --trust-model`")
    if mode == "black-box" and surrogate is None:
        surrogate = str(_bench_surrogate(model, surrogate_data, surrogate_budget, output, out_dir, show_progress, log,
                                         device=device, init=surrogate_init, classes=classes, max_memory=max_memory))
    results = {}
    for method in methods:
        cfg = ExplainConfig(model=model, data=data, mode=mode, method=method, pixels=pixels, limit=limit,
                            figures=figures, batch_size=batch_size, surrogate=surrogate, output=output, device=device,
                            max_memory=max_memory, classes=classes)
        log(f"bench: {method}")
        summary = run_explain(cfg, out_dir / method, show_progress=show_progress, log=log, ray=ray)
        results[method] = {k: v for k, v in summary.items() if k not in ("confusion", "confusion_pairs", "classes")}
    headline = results.get("paper") or next(iter(results.values()))
    combined = {**headline, "methods": results, "published": PAPER[mode]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(combined, indent=2))
    write_report(out_dir)  # the bench page, and each method's page compared with the paper
    return combined


def _bench_surrogate(model, surrogate_data, budget, output, out_dir: Path, show_progress, log,
                     allow_test_data: bool = False, device: str = "auto", init: str | list[str] | None = None,
                     classes: str | None = None, max_memory: str | None = None) -> Path:
    """Train the bench's surrogate once; a re-run (resume) reuses the one in the folder (one
    file per --surrogate-init SPEC)."""
    from .surrogate_run import run_surrogate

    if not surrogate_data:
        raise FlipbackError("a black-box bench needs --surrogate-data (or --surrogate FILE)",
                            hint="e.g. --surrogate-data cifar10/train --surrogate-budget 10000")
    # One SPEC hashes as it did before several were possible (a rerun finds its file).
    digest = hashlib.sha256("\n".join(init_specs(init)).encode()).hexdigest()[:8]
    tag = f"-init-{digest}" if init else ""
    path = out_dir / f"surrogate-{output}-{budget}{tag}.th"
    if path.is_file():
        log(f"using the bench's surrogate {path}")
        return path
    run_surrogate(target=model, data=surrogate_data, budget=budget, out=path, output=output,
                  allow_test_data=allow_test_data, device=device, show_progress=show_progress, log=log, init=init,
                  classes=classes, max_memory=max_memory)
    return path
