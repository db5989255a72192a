"""The command line. Typer gives typed options and --help for free; rich prints tables.

Errors meant for users are one line with a hint; --debug shows the traceback.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import FlipbackError
from .targets.surrogate import DEFAULT_MEMBERS, MEMBER_HELP

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Explain image misclassifications with the smallest change that makes the model right.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks against published figures.")
app.add_typer(bench_app, name="bench")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error, one line, however narrow the terminal
_state = {"quiet": False, "json": False, "debug": False}


class Mode(str, Enum):
    white_box = "white-box"
    black_box = "black-box"


class Output(str, Enum):
    scores = "scores"
    label = "label"


class Pixels(str, Enum):
    uint8 = "uint8"
    float = "float"


@app.callback()
def main(quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
         json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout only."),
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    _state.update(quiet=quiet or json_out, json=json_out, debug=debug)


def _fail(exc: BaseException) -> None:
    if _state["debug"]:
        raise exc
    if isinstance(exc, FlipbackError):
        err.print(f"[red]error:[/red] {exc.message}", markup=True, highlight=False)
        if exc.hint:
            err.print(f"hint: {exc.hint}", markup=False, highlight=False)
    else:
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False)
        err.print("hint: run again with --debug for the traceback", markup=False)
    raise typer.Exit(2)


def _log(msg: str) -> None:
    if not _state["quiet"]:
        err.print(msg, markup=False, highlight=False)


def _print_summary(summary: dict, run_dir: Path) -> None:
    if _state["json"]:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("confusion", "confusion_pairs")}))
        return
    if _state["quiet"]:
        return
    t = Table(title=f"{summary['method']} ({summary['mode']}, {summary['pixels']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("n_images", "accuracy", "n_misclassified", "n_explained", "n_corrected", "success_rate",
                "mean_queries", "mean_queries_success", "median_l2", "median_linf", "seconds",
                "images_per_second", "n_skipped", "surrogate_queries", "surrogate_agreement"):
        if key not in summary:
            continue
        v = summary.get(key)
        t.add_row(key, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(t)
    from .runs.explain_run import problem_lines

    for line in problem_lines(summary):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {(run_dir / 'index.html').resolve()}", markup=False, highlight=False)


def _guard(fn):
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err.print("interrupted: results so far are kept; run the same command again to resume")
        raise typer.Exit(130)
    except Exception as exc:  # noqa: BLE001 - every error becomes one clear line
        _fail(exc)


def _floats(text: Optional[str]):
    from .targets.loading import parse_floats

    return parse_floats(text)


def _step_option(method: str, step: Optional[str]) -> dict:
    if step is None:
        return {}
    if method != "paper":
        raise FlipbackError("--step applies to the paper method only")
    num, _, den = step.partition("/")
    try:
        value = float(num) / (float(den) if den else 1.0)
    except ValueError:
        raise FlipbackError(f"cannot read step '{step}'", hint="e.g. --step 2/255 or --step 0.0078") from None
    if not 0 < value <= 1:
        raise FlipbackError(f"step {step} is outside (0, 1]")
    return {"step": value}


def _confidence_option(method: str, mode: str, confidence: Optional[float]) -> dict:
    if confidence is None:
        return {}
    if method not in ("fast", "minimal") or mode != "black-box":
        # White-box, the target's own gradient sets the first step (fast's overshoot).
        raise FlipbackError("--confidence applies to the fast and minimal methods in black-box mode only")
    if not confidence > 0:
        raise FlipbackError(f"--confidence must be above 0 logits, got {confidence}")
    return {"confidence": float(confidence)}


def _ray_options(address: Optional[str], actors: Optional[int], cpus: float, gpus: float,
                 total_budget: Optional[int], rate_limit: Optional[float]):
    if address is None:
        if total_budget is not None or rate_limit is not None:
            raise FlipbackError("--total-budget and --rate-limit apply to --ray runs", hint="add --ray auto|local|HOST:PORT")
        return None
    from .runs.distributed import RayOptions

    return RayOptions(address=address, actors=actors, cpus=cpus, gpus=gpus, total_budget=total_budget,
                      rate_limit=rate_limit)


_INIT_HELP = ("Start the surrogate from this pretrained model (any white-box SPEC: ARCH:WEIGHTS, FILE.pt, FILE.pt2, "
              "hf:DIR, timm:NAME:WEIGHTS, python:MODULE:FACTORY); costs no target queries. A new linear head maps its "
              "outputs to the target's classes when their counts differ. Repeat it to start from several models: "
              "one new head reads all their outputs.")
_DEVICE_HELP = "auto (CUDA when there is one, then MPS, then the CPU) | cpu | cuda | cuda:N | mps: where the model runs."
_MEMORY_HELP = ("Memory cap that sizes the batches, e.g. 8G or 512M (default: 80% of the memory free when the run "
                "starts; on CUDA, of the GPU's). A run that cannot fit one image stops with an error.")

_RAY_HELP = ("auto | local | HOST:PORT: spread the batches over a Ray cluster (auto: the one this machine "
             "is part of; local: start one here). Needs `pip install 'flipback\\[ray]'`.")  # \[: not rich markup


@app.command()
def explain(
    model: str = typer.Option(..., help="ARCH:WEIGHTS (e.g. cifar_resnet20:model.th), FILE.pt (TorchScript), FILE.pt2 "
                              "(torch.export), timm:NAME[:WEIGHTS], hf:DIR, python:MODULE:FACTORY; see the README."),
    data: str = typer.Option(..., help="Image folder, IDX folder/file, or .npz."),
    out_dir: Path = typer.Option(..., "--out", help="Run folder (resumed when it holds the same run)."),
    mode: Mode = typer.Option(Mode.white_box, help="white-box: the model's gradients."),
    method: str = typer.Option("minimal", help="paper | fast | minimal | regions (each runs in both modes)"),
    budget: Optional[int] = typer.Option(None, help="Most queries per image (default: the method's)."),
    step: Optional[str] = typer.Option(None, help="paper method: step size, e.g. 2/255 (default 1/255)."),
    confidence: Optional[float] = typer.Option(None, help="fast and minimal, black-box: how many logits past the "
                                               "surrogate's own margin the first push aims (default 4). Higher: fewer "
                                               "queries, larger changes; choose it on errors outside the test split."),
    pixels: Pixels = typer.Option(Pixels.uint8, help="uint8: corrections must survive 8-bit rounding."),
    split: str = typer.Option("test", help="train or test, for IDX folders and folders with split sub-folders."),
    limit: Optional[int] = typer.Option(None, help="Explain only the first N errors."),
    mean: Optional[str] = typer.Option(None, help="Input normalization mean, e.g. 0.5,0.5,0.5."),
    std: Optional[str] = typer.Option(None, help="Input normalization std."),
    figures: bool = typer.Option(True, help="Write a PNG figure per image."),
    batch_size: int = typer.Option(256, min=1),
    resume: bool = typer.Option(True, help="Resume a run folder holding the same run."),
    trust_model: bool = typer.Option(False, help="Allow unpickling a full model file (can run code)."),
    surrogate: Optional[str] = typer.Option(None, help="black-box: surrogate file from `flipback surrogate`."),
    output: Output = typer.Option(Output.scores, help="black-box: the target returns scores, or only a label."),
    timeout: float = typer.Option(10.0, min=0.1, help="black-box: seconds to wait for one answer."),
    retries: int = typer.Option(3, min=0, help="black-box: retries of a failed call (5xx, 429, timeout, dropped connection)."),
    ray: Optional[str] = typer.Option(None, "--ray", help=_RAY_HELP),
    ray_actors: Optional[int] = typer.Option(None, min=1, help="--ray: actors (default: as many as the cluster's CPUs allow)."),
    ray_cpus: float = typer.Option(1.0, min=0, help="--ray: CPUs per actor."),
    ray_gpus: float = typer.Option(0.0, min=0, help="--ray: GPUs per actor (its model runs there)."),
    total_budget: Optional[int] = typer.Option(None, min=0, help="--ray: most counted queries of the whole run, all actors together."),
    rate_limit: Optional[float] = typer.Option(None, min=0.001, help="--ray, black-box: most requests per second to the target, all actors together."),
    device: str = typer.Option("auto", help="auto (CUDA when there is one) | cpu | cuda | cuda:N | mps: where the model (black-box: the surrogate) runs."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=_MEMORY_HELP),
    classes: Optional[Path] = typer.Option(None, help="The model's class names, one a line, in its output order: "
                                           "the data set's class folders are matched to them."),
):
    """Find the target's errors and explain each with a verified corrective change."""
    from .runs.explain_run import ExplainConfig, run_explain

    def go():
        cfg = ExplainConfig(model=model, data=data, mode=mode.value, method=method, pixels=pixels.value,
                            budget=budget, split=split, limit=limit, mean=_floats(mean), std=_floats(std),
                            trust_model=trust_model, figures=figures, batch_size=batch_size,
                            options={**_step_option(method, step), **_confidence_option(method, mode.value, confidence)},
                            surrogate=surrogate, output=output.value,
                            timeout=timeout, retries=retries, device=device, max_memory=max_memory,
                            classes=str(classes) if classes else None)
        summary = run_explain(cfg, out_dir, show_progress=not _state["quiet"], resume=resume, log=_log,
                              ray=_ray_options(ray, ray_actors, ray_cpus, ray_gpus, total_budget, rate_limit))
        _print_summary(summary, out_dir)

    _guard(go)


@bench_app.command("paper")
def bench_paper(
    model: str = typer.Option(..., help="Model SPEC, e.g. cifar_resnet20:cifar10_resnet20.th"),
    data: str = typer.Option(..., help="Test data."),
    out_dir: Path = typer.Option(..., "--out"),
    mode: Mode = typer.Option(Mode.white_box),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: all of the mode's)."),
    pixels: Pixels = typer.Option(Pixels.uint8),
    limit: Optional[int] = typer.Option(None, help="Only the first N errors."),
    figures: bool = typer.Option(False, help="Write per-image figures (slow for thousands of images)."),
    batch_size: int = typer.Option(256, min=1),
    surrogate_data: Optional[str] = typer.Option(None, help="black-box: images to train the surrogate on."),
    surrogate_budget: int = typer.Option(10000, help="black-box: target queries for the surrogate."),
    surrogate: Optional[str] = typer.Option(None, help="black-box: use this surrogate instead of training one."),
    surrogate_init: Optional[List[str]] = typer.Option(None, "--surrogate-init", "--init", metavar="SPEC",
                                                 help="black-box: " + _INIT_HELP),
    output: Output = typer.Option(Output.scores, help="black-box: the target returns scores, or only a label."),
    ray: Optional[str] = typer.Option(None, "--ray", help=_RAY_HELP),
    ray_actors: Optional[int] = typer.Option(None, min=1, help="--ray: actors (default: as many as the cluster's CPUs allow)."),
    ray_cpus: float = typer.Option(1.0, min=0, help="--ray: CPUs per actor."),
    ray_gpus: float = typer.Option(0.0, min=0, help="--ray: GPUs per actor (its model runs there)."),
    total_budget: Optional[int] = typer.Option(None, min=0, help="--ray: most counted queries of the whole run, all actors together."),
    rate_limit: Optional[float] = typer.Option(None, min=0.001, help="--ray, black-box: most requests per second to the target, all actors together."),
    device: str = typer.Option("auto", help=_DEVICE_HELP + " Black-box: the surrogate."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=_MEMORY_HELP),
    classes: Optional[Path] = typer.Option(None, help="The model's class names, one a line, in its output order "
                                           "(as explain's --classes)."),
):
    """Run each method on all errors and compare with the published figures."""
    from .runs.bench import PAPER, run_bench

    def go():
        result = run_bench(model=model, data=data, out_dir=out_dir, mode=mode.value,
                           methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None, pixels=pixels.value,
                           limit=limit, figures=figures, batch_size=batch_size,
                           surrogate=surrogate, surrogate_data=surrogate_data, surrogate_budget=surrogate_budget,
                           surrogate_init=surrogate_init or None, output=output.value, show_progress=not _state["quiet"], log=_log,
                           device=device, max_memory=max_memory, classes=str(classes) if classes else None,
                           ray=_ray_options(ray, ray_actors, ray_cpus, ray_gpus, total_budget, rate_limit))
        if _state["json"]:
            print(json.dumps(result))
            return
        ref = PAPER[mode.value]
        t = Table(title=f"flipback vs the paper ({mode.value}, {pixels.value} pixels)")
        for col in ("method", "success", "mean queries", "queries (successes)", "median L2", "median Linf",
                    "img/s"):
            t.add_column(col, justify="right")
        t.add_row("published (Haffar et al. 2021)", f"{ref['success_rate']:.2%}", f"{ref['mean_queries']:.2f}",
                  "", "", "", "")
        for name, s in result["methods"].items():
            t.add_row(name, f"{s['success_rate']:.2%}", f"{s['mean_queries']:.3f}",
                      f"{s['mean_queries_success']:.3f}" if s["mean_queries_success"] is not None else "-",
                      f"{s['median_l2']:.4f}" if s["median_l2"] is not None else "-",
                      f"{s['median_linf'] * 255:.1f}/255" if s["median_linf"] is not None else "-",
                      f"{s['images_per_second']:.1f}")
        out.print(t)
        out.print(f"summary: {(out_dir / 'summary.json').resolve()}", markup=False, highlight=False)

    _guard(go)


@bench_app.command("faithfulness")
def bench_faithfulness(
    out_dir: Path = typer.Option(..., "--out"),
    data: Optional[str] = typer.Option(None, help="Data with train and test splits (default: Debian's Fashion-MNIST)."),
    model: Optional[str] = typer.Option(None, help="ARCH:WEIGHTS to fine-tune with the cue (default: small_cnn "
                                        "from scratch); with --real, the model whose errors are explained."),
    real: bool = typer.Option(False, "--real", help="The model's own test errors instead of planted ones."),
    limit: int = typer.Option(500, min=1, help="How many errors to explain."),
    baselines: Optional[str] = typer.Option(None, help="Comma-separated Captum baselines (default: all, with "
                                            "lime, kernel_shap and feature_ablation on regions' superpixels)."),
    cue_size: Optional[int] = typer.Option(None, "--cue-size", min=2, max=8,
                                           help="Side of the planted patch, px (2, 3, 4, 6: smaller is harder; "
                                           "default 4, and 6 for the sticker)."),
    kind: str = typer.Option("checker", "--kind",
                             help="Planted cue: checker, sticker, or, and, blend, background (Fashion-MNIST)."),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
):
    """Do explanations point at the real cause? flipback's regions against Captum baselines:
    pointing game and top-k precision on planted causes, deletion-to-correct everywhere, and
    Quantus's localisation metrics and ROAD when the quantus extra is installed."""
    from .runs.faithfulness import BASELINES, SUPERPIXEL_BASELINES, run_faithfulness

    known = BASELINES + SUPERPIXEL_BASELINES

    def go():
        chosen = tuple(b.strip() for b in baselines.split(",") if b.strip()) if baselines else known
        from .data.planted import KINDS

        if kind not in KINDS:
            raise FlipbackError(f"unknown cue kind '{kind}'", hint=f"choose from: {', '.join(KINDS)}")
        unknown = [b for b in chosen if b not in known]
        if unknown:
            raise FlipbackError(f"unknown baseline '{unknown[0]}'", hint=f"choose from: {', '.join(known)}")
        result = run_faithfulness(data=data, model=model, out_dir=out_dir, real=real, limit=limit, baselines=chosen,
                                  device=device, show_progress=not _state["quiet"], log=_log, cue_size=cue_size,
                                  kind=kind)
        if _state["json"]:
            print(json.dumps(result))
            return
        _print_faithfulness(result)
        out.print(f"summary: {(out_dir / 'summary.json').resolve()}", markup=False, highlight=False)

    _guard(go)


def _print_faithfulness(result: dict) -> None:
    if _state["quiet"]:
        return
    masked = result["kind"] == "planted" and "pointing" in result["methods"]["flipback-regions"]
    corr = "pattern_correlation" in result["methods"]["flipback-regions"]
    both = "both_found" in result["methods"]["flipback-regions"]
    planted = masked
    t = Table(title=f"faithfulness on {result['n_images']} {result['kind']} errors",
              caption="baselines: the better of their two variants (predicted class; predicted minus true), "
                      "metric by metric. 1%..10%: errors corrected once that share of the pixels, top "
                      "ranked by the map, is blurred; AUC: the area under that curve.")
    cols = (["point", "top-k"] if planted else []) + \
        [f"{float(f):.0%}" for f in result["fractions"]] + ["AUC", "s/img"]
    t.add_column("method", no_wrap=True, overflow="fold")
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for name, m in result["methods"].items():
        row = m.get("best", m)
        cells = ([f"{row['pointing']:.1%}", f"{row['topk_precision']:.2f}"] if planted else []) + \
            [f"{row['deletion'][str(f)]:.0%}" for f in result["fractions"]] + \
            [f"{row['deletion_auc']:.3f}", f"{row['seconds_per_image']:.3f}"]
        t.add_row(name.replace("integrated_gradients", "integ_grads").replace("flipback-", "flipback "), *cells)
    out.print(t)
    if "mean_rank" not in result:
        return
    q = Table(title="metrics flipback did not write (Quantus)",
              caption="point: pointing game; rank, mass: relevance rank and mass accuracy; ROAD: errors corrected "
                      "once the top 1..10% of pixels are imputed (noisy linear), and its AUC; mean rank over "
                      "these (1 = best).")
    qcols = (["point", "rank", "mass"] if planted else []) + (["corr"] if corr else []) + \
        (["both"] if both else []) + ["ROAD 1%", "10%", "AUC", "evals/img", "s/img", "mean rank"]
    q.add_column("method", no_wrap=True, overflow="fold")
    for col in qcols:
        q.add_column(col, justify="right", no_wrap=True)
    for name, m in sorted(result["methods"].items(), key=lambda kv: result["mean_rank"].get(kv[0], 99)):
        row = m.get("best", m)
        cells = ([f"{row['quantus_pointing_game']:.1%}", f"{row['quantus_relevance_rank_accuracy']:.2f}",
                  f"{row['quantus_relevance_mass_accuracy']:.2f}"] if planted else []) + \
            ([f"{row['pattern_correlation']:.3f}"] if corr else []) + \
            ([f"{row['both_found']:.0%}"] if both else []) + \
            [f"{row['road']['1.0']:.0%}", f"{row['road']['10.0']:.0%}", f"{row['road_auc']:.3f}",
             f"{row['evaluations_per_image']:.0f}" if row.get("evaluations_per_image") is not None else "-",
             f"{row['seconds_per_image']:.3f}", f"{result['mean_rank'][name]:.2f}"]
        q.add_row(name.replace("integrated_gradients", "integ_grads").replace("flipback-", "flipback "), *cells)
    out.print(q)


@app.command("surrogate")
def surrogate_cmd(
    target: str = typer.Option(..., help="The black-box target SPEC."),
    data: str = typer.Option(..., help="Images to query the target on (labels are not needed)."),
    budget: int = typer.Option(..., help="Most target queries to spend."),
    out_file: Path = typer.Option(..., "--out", help="Where to save the surrogate."),
    split: str = typer.Option("train", help="train or test, for IDX folders and split folders."),
    output: Output = typer.Option(Output.scores, help="Learn from the target's scores, or only its labels."),
    epochs: int = typer.Option(30, min=0, help="Training epochs. 0: only for --init members, which then keep "
                               "the pretrained model with a linear probe as its new head (no fine-tuning)."),
    batch_size: int = typer.Option(128, min=1, help="Images per training step (lower it for large images on a "
                                   "small GPU; the learning rate stays)."),
    members: Optional[str] = typer.Option(None,
                                          help=f"Surrogate models, comma-separated, trained on the same answers and "
                                               f"averaged: {MEMBER_HELP}; 'init' is the --init model "
                                               f"(default: {','.join(DEFAULT_MEMBERS)}; with --init: init alone)."),
    init: Optional[List[str]] = typer.Option(None, "--init", metavar="SPEC", help=_INIT_HELP),
    classes: Optional[Path] = typer.Option(None, help="The target's class names, one a line, in its output order "
                                           "(as explain's --classes)."),
    seed: int = typer.Option(0),
    mean: Optional[str] = typer.Option(None, help="Normalization the target expects, if it does not do it."),
    std: Optional[str] = typer.Option(None),
    allow_test_data: bool = typer.Option(False, "--allow-test-data",
                                         help="Train on test (or validation) images anyway; refused otherwise."),
    device: str = typer.Option("auto", help=_DEVICE_HELP + " (the surrogate's training)"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory",
                                             help="Memory cap that sizes the training batches (at most --batch-size), "
                                                  "e.g. 8G (default: 80% of the memory free when training starts; on "
                                                  "CUDA, of the GPU's). A member that cannot fit one image stops "
                                                  "with an error."),
    self_train: int = typer.Option(0, "--self-train", min=0,
                                   help="Then refit on the answers plus this many images of --data never sent to the "
                                        "target, labelled by the first surrogate (self-training: no queries; twice "
                                        "the training time or more). Not with --init."),
    active: float = typer.Option(0.0, "--active", min=0.0, max=0.99,
                                 help="Share of the budget chosen actively: the rest is spent on random images "
                                      "first, and a surrogate fitted to those answers picks these, the images it is "
                                      "least sure about (one more training). Not with --init."),
):
    """Train a surrogate of a black-box target from its answers alone."""
    from .runs.surrogate_run import run_surrogate

    def go():
        meta = run_surrogate(target=target, data=data, budget=budget, out=out_file, split=split,
                             output=output.value, epochs=epochs, members=members, seed=seed, mean=_floats(mean),
                             batch_size=batch_size, max_memory=max_memory, self_train=self_train,
                             active=active, std=_floats(std), allow_test_data=allow_test_data, device=device,
                             show_progress=not _state["quiet"],
                             log=_log, init=init or None, classes=str(classes) if classes else None)
        if _state["json"]:
            print(json.dumps(meta))
        elif not _state["quiet"]:
            out.print(f"surrogate: {out_file} ({meta['queries']} queries, agreement with the target on "
                      f"{meta['held_out']} held-out images: {meta['agreement']:.1%})", markup=False, highlight=False)

    _guard(go)


@app.command("audit")
def audit_cmd(
    data: str = typer.Option(..., help="The model's training data (its train split is audited)."),
    model: str = typer.Option(..., help="The white-box model, ARCH:WEIGHTS or another SPEC."),
    out_dir: Path = typer.Option(..., "--out"),
    validation: float = typer.Option(0.1, min=0.01, max=0.5,
                                     help="Share of the train split carved out (seeded, per class) as validation; "
                                          "the model should not have trained on it."),
    run: Optional[Path] = typer.Option(None, help="Use the corrected errors of this explain run (on validation "
                                       "data) instead of carving a validation split."),
    labels: bool = typer.Option(True, "--labels/--no-labels", help="Also look for likely wrong labels."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
    fiftyone: Optional[Path] = typer.Option(None, help="Also export the suspects, with their change maps as "
                                            "heatmaps, to this new folder as a FiftyOne dataset (the fiftyone extra)."),
):
    """Rank the training images behind the errors: carriers of a recurring cause, and likely
    wrong labels. Writes suspects.csv, audit.json and audit.html."""
    from .runs.audit import run_audit

    def go():
        summary = run_audit(model=model, data=data, out_dir=out_dir, validation=validation, run=run, labels=labels,
                            seed=seed, device=device, fiftyone=fiftyone, show_progress=not _state["quiet"], log=_log)
        if _state["json"]:
            print(json.dumps({k: v for k, v in summary.items() if k != "validation_rows"}))
        elif not _state["quiet"]:
            st = summary["stats"]
            out.print(f"{summary['n_suspects']} suspects: {st['cause_verified']} verified carriers of "
                      f"{st['n_causes']} recurring cause(s), {st['label_flagged']} likely wrong labels; "
                      f"{(out_dir / 'audit.html').resolve()}", markup=False, highlight=False)

    _guard(go)


@app.command("repair")
def repair_cmd(
    audit_dir: Path = typer.Argument(..., help="A folder written by flipback audit."),
    out_dir: Path = typer.Option(..., "--out"),
    drop: str = typer.Option("cause", help="Comma-separated suspect reasons to drop: cause, label, or none."),
    relabel: bool = typer.Option(False, "--relabel", help="Relabel likely wrong labels toward the model's "
                                 "answer (soft labels, see --relabel-weight) instead of dropping them."),
    relabel_weight: Optional[float] = typer.Option(None, "--relabel-weight", min=0.01, max=1.0,
                                                   help="With --relabel: the share of each relabelled image's "
                                                   "training target on the model's answer; the rest stays on its "
                                                   "given label (1: a hard relabel; default 0.7, chosen on "
                                                   "validation)."),
    corrective: bool = typer.Option(False, "--corrective", help="Add the validation errors' corrected images, "
                                    "with their true labels, to the training data."),
    test: Optional[str] = typer.Option(None, help="Data whose test split measures before and after "
                                       "(default: the audited data's)."),
):
    """Apply an audit: drop or relabel suspects, retrain by the project's recipe, and compare
    before and after on the test split. Writes repair.json and repair.html."""
    from .runs.audit import run_repair

    def go():
        reasons = tuple(r.strip() for r in drop.split(",") if r.strip() and r.strip() != "none")
        bad = [r for r in reasons if r not in ("cause", "label")]
        if bad:
            raise FlipbackError(f"unknown reason '{bad[0]}' in --drop", hint="use cause, label, both or none")
        summary = run_repair(audit_dir=audit_dir, out_dir=out_dir, drop=reasons, relabel=relabel,
                             corrective=corrective, test=test, show_progress=not _state["quiet"], log=_log,
                             **({} if relabel_weight is None else {"relabel_weight": relabel_weight}))
        if _state["json"]:
            print(json.dumps(summary))
        elif not _state["quiet"]:
            b, a = summary["before"], summary["after"]
            extra = "".join(f"; {k} {b[k]:.1%} -> {a[k]:.1%}" for k in b if k.startswith("cause_success"))
            out.print(f"test accuracy {b['accuracy']:.2%} -> {a['accuracy']:.2%}{extra}; "
                      f"{(out_dir / 'repair.html').resolve()}", markup=False, highlight=False)

    _guard(go)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder written by explain, bench or demo.")):
    """Write (again) the HTML report of a run folder."""
    from .runs.report_run import rebuild_report

    def go():
        path = rebuild_report(run_dir)
        if not _state["quiet"]:
            out.print(f"report: {path.resolve()}", markup=False, highlight=False)

    _guard(go)


@app.command()
def demo(
    data: Optional[str] = typer.Option(None, help="Fashion-MNIST IDX folder (default: Debian's dataset-fashion-mnist)."),
    out_dir: Path = typer.Option(Path("runs/demo"), "--out"),
    method: str = typer.Option("minimal", help="The white-box method (the black-box half uses minimal, with a one-CNN surrogate)."),
    limit: Optional[int] = typer.Option(None, help="Explain only the first N errors."),
    device: str = typer.Option("auto", help=_DEVICE_HELP + " (the explained model and the surrogate)"),
):
    """Train (once) a small CNN on Fashion-MNIST and explain its test-set errors, white-box
    and black-box."""
    from .runs.demo import run_demo

    def go():
        summaries = run_demo(data=data, out_dir=out_dir, method=method, limit=limit, device=device,
                             show_progress=not _state["quiet"], log=_log)
        if _state["json"]:
            print(json.dumps({mode: {k: v for k, v in s.items() if k not in ("confusion", "confusion_pairs")} for mode, s in summaries.items()}))
            return
        for mode, summary in summaries.items():
            _print_summary(summary, out_dir / mode)

    _guard(go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
