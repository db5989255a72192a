"""`flipback explain`: data set -> target -> corrective attack -> explanation -> store -> report.

Per-image results are committed to the run's store batch by batch, so a killed run
resumes where it stopped and never re-spends queries on a finished image.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..attacks import AttackResult
from ..data import Dataset
from ..errors import ModelError, RunError
from ..explain import explain_changes, save_figure
from ..explain.recurring import recurring_causes
from ..report import write_report
from ..store import ImageRecord, RunStore
from ..targets.answers import BudgetExceeded as BudgetExceededError
from ..targets.answers import TargetError
from ..targets.loading import dataset_for_model
from ..targets.surrogate import as_probabilities
from .engine import Engine, build_engine
from .errors import Predictions, predict_dataset, to_tensor
from ..targets.device import resolve_device
from .memory import MemoryLimitError, human, is_out_of_memory, plan_for_engine
from .progress import progress_bar


@dataclass
class ExplainConfig:
    model: str
    data: str
    mode: str = "white-box"
    method: str = "minimal"
    pixels: str = "uint8"
    budget: int | None = None  # most queries per image; None: the method's default
    split: str = "test"
    limit: int | None = None  # explain only the first N errors
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    trust_model: bool = False
    figures: bool = True
    batch_size: int = 256
    surrogate: str | None = None  # black-box mode: the surrogate file
    output: str = "scores"  # black-box mode: the target returns "scores" or only a top-1 "label"
    options: dict = field(default_factory=dict)  # extra attack options, e.g. {"step": 2/255}
    timeout: float = 10.0  # black-box: seconds to wait for one answer
    retries: int = 3  # black-box: retries of a failed call (5xx, 429, timeout, dropped connection)
    device: str = "auto"  # where the model (white-box) or the surrogate (black-box) runs: auto, cpu, cuda, cuda:N, mps
    max_memory: str | None = None  # cap for sizing batches, e.g. "8G"; None: 80% of what is free (runs/memory.py)
    classes: str | None = None  # a file of the model's class names, one a line, in its output order

    def identity(self, data_fingerprint: str, model_fingerprint: str) -> dict:
        """What must match for a run folder to be resumed."""
        keep = ("model", "mode", "method", "pixels", "budget", "split", "limit", "mean", "std", "options",
                "surrogate", "output")  # classes: the data fingerprint holds the mapping it made
        d = {k: v for k, v in asdict(self).items() if k in keep}
        return {**d, "data_fingerprint": data_fingerprint, "model_fingerprint": model_fingerprint}


def file_fingerprint(spec: str) -> str:
    """Hash of the model file(s) named in a spec, so a changed checkpoint is a new run."""
    h = hashlib.sha256(spec.encode())
    for part in spec.split(":"):
        p = Path(part)
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _probabilities(scores: torch.Tensor) -> list[list[float] | None]:
    """Logits (white-box) or the target's scores (black-box) as rounded probabilities; None for
    a row without an answer (never asked, hard-label, or non-finite)."""
    scores = scores.cpu()
    given = torch.isfinite(scores).all(1)
    out: list[list[float] | None] = [None] * len(scores)
    if bool(given.any()):
        probs = as_probabilities(scores[given])
        for j, row in zip(given.nonzero().squeeze(1).tolist(), probs):
            out[j] = [round(float(p), 6) for p in row]
    return out


def _records(ds: Dataset, idx: np.ndarray, result: AttackResult, before: torch.Tensor,
             explanations, figure_paths, image_paths) -> list[ImageRecord]:
    labels = ds.labels[idx]
    after = result.answered().cpu().numpy()  # the oracle's real answer; -1 where it never answered
    prob_before, prob_after = _probabilities(before), _probabilities(result.logits)
    out = []
    for j, i in enumerate(idx):
        e = explanations[j]
        pb, pa = int(before[j].argmax()), int(after[j])
        out.append(ImageRecord(
            index=int(i), name=ds.names[i], true=int(labels[j]), pred_before=pb, pred_after=pa,
            true_name=ds.classes[labels[j]], pred_before_name=ds.classes[pb],
            pred_after_name=ds.classes[pa] if pa >= 0 else None,
            success=bool(result.success[j]), queries=int(result.queries[j]),
            l2=e.l2, linf=e.linf, l0=e.l0, frac_changed=e.frac_changed, regions=e.to_dict()["regions"],
            n_regions=len(e.regions), region_fraction=float(sum(r.area for r in e.regions)) / e.heatmap.size,
            scores_before=prob_before[j],
            scores_after=prob_after[j],
            figure=figure_paths[j], corrected_image=image_paths[j],
            trace=result.trace[j] if result.trace is not None else None,
            change=result.change[j] if result.change is not None else None))
    return out


def _save_images(run_dir: Path, ds: Dataset, idx, originals, corrected, explanations, before, result,
                 cfg: ExplainConfig):
    figure_paths, image_paths = [], []
    after_pred = result.answered().cpu()
    after_scores = _probabilities(result.logits)
    for j, i in enumerate(idx):
        name = f"{int(i):06d}.png"  # our own names: never a path taken from the data set
        if cfg.pixels == "uint8":
            arr = np.round(corrected[j] * 255).astype(np.uint8)
            (run_dir / "corrected").mkdir(exist_ok=True)
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(run_dir / "corrected" / name)
            image_paths.append(f"corrected/{name}")
        else:
            image_paths.append(None)
        if cfg.figures:
            save_figure(run_dir / "figures" / name, originals[j], corrected[j], explanations[j],
                        class_names=ds.classes, true_label=int(ds.labels[i]), pred_before=int(before[j].argmax()),
                        pred_after=int(after_pred[j]), scores_before=as_probabilities(before[j:j + 1])[0].numpy(),
                        scores_after=None if after_scores[j] is None else np.asarray(after_scores[j]))
            figure_paths.append(f"figures/{name}")
        else:
            figure_paths.append(None)
    return figure_paths, image_paths


def _failed(x: torch.Tensor, num_classes: int) -> AttackResult:
    """The result of an image whose attack raised: unchanged, not corrected, no answer."""
    return AttackResult(x.clone(), torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x), dtype=torch.long),
                        torch.full((len(x), num_classes), float("nan")), labels=torch.full((len(x),), -1),
                        trace=[[] for _ in range(len(x))])


def _stops_run(exc: Exception) -> bool:
    """A spent total budget or an unusable model stops the run; a spent per-image budget is
    that image's failure."""
    if isinstance(exc, BudgetExceededError):
        return exc.kind != "per_image"
    return isinstance(exc, ModelError)


def _stopped(exc: Exception) -> RunError:
    return RunError(f"the target stopped answering ({getattr(exc, 'message', exc)}); the results so far are kept",
                    hint="run the same command again to resume once it is back")


@contextmanager
def _stop_cleanly_when_unavailable():
    """Turn a target that is down into a clean, resumable stop (it may be back later)."""
    try:
        yield
    except TargetError as exc:
        if exc.transient:
            raise _stopped(exc) from None
        raise


def _attack_batch(engine: Engine, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray):
    """Attack a batch; if it breaks, retry image by image so one bad image costs only itself.
    What the failed batch spent stays charged to its images (the oracle's ledger keeps it), and
    each image's second try gets only what its budget has left.

    Returns (result, errors, retry): errors[k] is why image k failed (None if it did not raise),
    retry[k] says the failure was the target being unavailable, so a resumed run tries again.
    Whole-run problems stop the run, and so does a target that fails twice in a row for want
    of answering (down, hanging, rate limiting): the batch is not committed, and running the
    same command again resumes it."""
    try:
        return _to_cpu(engine.run(x, y, idx)), [None] * len(x), [False] * len(x)
    except Exception as exc:
        if _stops_run(exc):
            raise
    results, errors, retry, streak = [], [], [], 0
    for k in range(len(x)):
        try:
            results.append(_to_cpu(engine.run(x[k:k + 1], y[k:k + 1], idx[k:k + 1])))
            errors.append(None)
            retry.append(False)
            streak = 0
            continue
        except Exception as exc:
            if _stops_run(exc) or is_out_of_memory(exc):  # one image does not fit: no use going on
                raise
            transient = bool(getattr(exc, "transient", False))
            streak = streak + 1 if transient else 0
            if streak >= 2:
                raise _stopped(exc) from None
            results.append(_failed(x[k:k + 1], engine.oracle.num_classes))
            errors.append(f"{type(exc).__name__}: {exc}")
            retry.append(transient)
    return concat_results(results), errors, retry


def _to_cpu(r: AttackResult) -> AttackResult:
    """Results leave the device once, for the store and the figures."""
    return AttackResult(*(None if t is None else t.cpu() for t in
                          (r.corrected, r.success, r.queries, r.logits, r.labels, r.regions, r.importance, r.order)),
                        trace=r.trace, change=r.change)


def concat_results(results: list[AttackResult]) -> AttackResult:
    """One result from per-image ones; a region method's maps are kept, zero for failed images."""
    extras = {}
    for f in ("regions", "importance", "order"):
        parts = [getattr(r, f) for r in results]
        like = next((p for p in parts if p is not None), None)
        if like is not None:
            extras[f] = torch.cat([p if p is not None else torch.zeros((1, *like.shape[1:]), dtype=like.dtype)
                                   for p in parts])
    trace = [t for r in results for t in (r.trace if r.trace is not None else [[]] * len(r))]
    if any(r.change is not None for r in results):
        extras["change"] = [c for r in results for c in (r.change if r.change is not None else [None] * len(r))]
    return AttackResult(*(torch.cat([getattr(r, f) for r in results]) for f in
                          ("corrected", "success", "queries", "logits", "labels")), trace=trace, **extras)


def problem_lines(summary: dict) -> list[str]:
    """One line per kind of problem met: images skipped by reason, images the model gave no
    answer for, explanations that failed with an error."""
    lines = []
    for key, what in (("skipped_by_reason", "skipped"), ("unanswered_by_reason", "without an answer")):
        counts = summary.get(key) or {}
        if counts:
            n = sum(counts.values())
            parts = ", ".join(f"{reason}: {k}" for reason, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"{what}: {n} image{'s' if n != 1 else ''} ({parts})")
    if summary.get("n_failed_with_error"):
        lines.append(f"failed with an error: {summary['n_failed_with_error']} images"
                     + (f", {summary['n_to_retry']} to retry on resume" if summary.get("n_to_retry") else ""))
    return lines


def _write_atomic(path: Path, text: str) -> None:
    """A kill mid-write leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def summarize(cfg: ExplainConfig, ds: Dataset, preds: Predictions, records: list[ImageRecord],
              seconds: float) -> dict:
    ok = [r for r in records if r.success]
    q = np.array([r.queries for r in records], dtype=float)
    qs = np.array([r.queries for r in ok], dtype=float)

    def stat(f, key, rows):
        vals = np.array([getattr(r, key) for r in rows], dtype=float)
        return float(f(vals)) if len(vals) else None

    errors = preds.misclassified
    return {
        "mode": cfg.mode, "method": cfg.method, "model": cfg.model, "data": cfg.data, "split": cfg.split,
        "pixels": cfg.pixels, "budget": cfg.budget, "options": dict(cfg.options),
        "n_images": int(len(ds)), "n_skipped": len(ds.skipped),
        "skipped_by_reason": dict(Counter(s.reason.split(":")[0] for s in ds.skipped)),
        "accuracy": preds.accuracy, "n_misclassified": int(len(errors)), "n_explained": len(records),
        "n_corrected": len(ok), "success_rate": len(ok) / len(records) if records else None,
        "mean_queries": float(q.mean()) if len(q) else None,
        "mean_queries_success": float(qs.mean()) if len(qs) else None,
        "median_queries": float(np.median(q)) if len(q) else None,
        "median_l2": stat(np.median, "l2", ok), "mean_l2": stat(np.mean, "l2", ok),
        "median_linf": stat(np.median, "linf", ok), "mean_linf": stat(np.mean, "linf", ok),
        "median_l0": stat(np.median, "l0", ok), "mean_frac_changed": stat(np.mean, "frac_changed", ok),
        "median_regions": stat(np.median, "n_regions", ok),
        "median_region_fraction": stat(np.median, "region_fraction", ok),
        # Region methods: how many corrections are removals, how many the free fallback's.
        "corrected_by_change": dict(Counter(r.change for r in ok if r.change is not None)),
        "n_failed_with_error": sum(1 for r in records if r.error),
        "n_to_retry": sum(1 for r in records if r.retry),
        "seconds": seconds, "images_per_second": len(records) / seconds if seconds > 0 else None,
        "classes": ds.classes, **preds.confusion_summary(ds.num_classes),
    }


@dataclass
class ExplainedBatch:
    """One batch of errors explained, ready for `RunStore.add`."""

    records: list[ImageRecord]
    corrected: np.ndarray  # as stored: uint8 (8-bit runs) or float32, (N, H, W, C)
    originals: np.ndarray  # uint8, (N, H, W, C)
    seconds: float  # attack time


def explain_batch(engine: Engine, ds: Dataset, idx: np.ndarray, cfg: ExplainConfig, run_dir: Path) -> ExplainedBatch:
    """The per-batch work: attack the errors `idx` of `ds`, explain the changes, write their
    figures and corrected PNGs under run_dir, and make their records. The local loop and a Ray
    actor (runs/distributed.py) both call it, so their results are the same by construction.
    A target that stops the run raises RunError; when it stopped the attack, `exc.unfinished`
    holds {image: queries spent} for the store."""
    images = ds.images[idx]
    x, y = to_tensor(images), torch.from_numpy(ds.labels[idx])
    t0 = time.perf_counter()
    with _stop_cleanly_when_unavailable():
        before = engine.scores(x)
    try:
        result, errors, retry = _attack_batch(engine, x, y, idx)
    except RunError as exc:
        exc.unfinished = dict(zip(idx.tolist(), engine.spent(idx).tolist()))
        raise
    # The oracle's count: retries, failed attempts and earlier sessions too.
    result.queries = torch.from_numpy(engine.spent(idx).astype(np.int64))
    seconds = time.perf_counter() - t0
    originals = x.permute(0, 2, 3, 1).numpy()
    corrected = result.corrected.permute(0, 2, 3, 1).numpy()
    ranks = None if result.regions is None else result.regions.numpy()
    gain = None if result.importance is None else result.importance.numpy()
    explanations = explain_changes(originals, corrected, region_ranks=ranks, region_gain=gain)
    fig_paths, img_paths = _save_images(run_dir, ds, idx, originals, corrected, explanations, before, result, cfg)
    records = _records(ds, idx, result, before, explanations, fig_paths, img_paths)
    # The model answered NaN or infinity on the last candidate. Black-box targets raise on
    # such answers instead, and hard-label ones have no scores.
    nonfinite = (~torch.isfinite(result.logits).all(1) & (result.queries > 0) & ~result.success
                 & (result.answered() >= 0) & (engine.oracle.output == "scores")).tolist()
    for rec, err, again, bad in zip(records, errors, retry, nonfinite):
        rec.error = err or ("non-finite scores: the model answered NaN or infinity on the last "
                            "candidate" if bad else None)
        rec.retry = bool(again)
    stored = np.round(corrected * 255).astype(np.uint8) if cfg.pixels == "uint8" else corrected
    return ExplainedBatch(records, stored, images, seconds)


def summarize_run(cfg: ExplainConfig, ds: Dataset, preds: Predictions, store: RunStore, engine_summary: dict,
                  target_session: dict) -> dict:
    """The run's summary from everything in its store (local and Ray runs alike)."""
    records = store.records()
    summary = summarize(cfg, ds, preds, records, store.seconds())
    summary.update(engine_summary)
    summary["recurring_causes"] = recurring_causes(records, store.images, ds.classes)
    summary["target_session"] = target_session  # this session's calls, retries and waits
    summary["n_unanswered"] = len(preds.failed)
    summary["unanswered_by_reason"] = dict(Counter(r.split(":")[0] for r in preds.failed.values()))
    if "surrogate_queries" in summary and records:
        summary["surrogate_queries_per_image"] = summary["surrogate_queries"] / len(records)
    return summary


def run_explain(cfg: ExplainConfig, run_dir: Path, *, show_progress: bool = True, resume: bool = True,
                log=print, ray=None) -> dict:
    """Explain every error of the data set into the run folder run_dir (resumed when it holds
    the same run). `ray` (runs.distributed.RayOptions) spreads the batches over a Ray cluster."""
    if ray is not None:
        from .distributed import run_explain_ray

        return run_explain_ray(cfg, Path(run_dir), ray, show_progress=show_progress, resume=resume, log=log)
    resolve_device(cfg.device)  # a device that is not there: one clear error before the data is read
    # Decoded with the model's eval transform, classes matched to the model's (targets/loading.py).
    ds = dataset_for_model(cfg.model, cfg.data, split=cfg.split, classes=cfg.classes, progress=show_progress)
    engine = build_engine(cfg, ds.num_classes, ds.shape)
    mem = plan_for_engine(engine, cfg, ds.shape)  # batch sizes under --max-memory, before any work
    if mem.batch_size < cfg.batch_size:
        log(f"memory: batches of {mem.batch_size} images (about {human(mem.per_image)} each, with "
            f"{human(mem.in_use)} in use, under a cap of {human(mem.cap)})")
    run_dir = Path(run_dir)
    identity = cfg.identity(ds.fingerprint, file_fingerprint(cfg.model) + file_fingerprint(cfg.surrogate or ""))
    with engine, RunStore.open(run_dir, identity, resume=resume) as store:
        with _stop_cleanly_when_unavailable():
            preds = predict_dataset(engine.scores, ds, show_progress=show_progress,
                                    batch_size=mem.predict_batch_size)
        todo_all = preds.misclassified[: cfg.limit] if cfg.limit is not None else preds.misclassified
        done = store.done()
        todo = np.array([i for i in todo_all if int(i) not in done], dtype=np.int64)
        if done:
            log(f"resuming: {len(done)} of {len(todo_all)} errors already explained")
        # Images an unavailable target failed, or left unfinished when it stopped the run, keep
        # what they spent, so that their budgets hold across sessions.
        again = {**store.unfinished(), **store.to_retry()}
        if again:
            ids = np.array(sorted(again), dtype=np.int64)
            engine.add_spent(ids, np.array([again[i] for i in ids], dtype=np.int64))
        with progress_bar(f"explaining ({cfg.method})", total=len(todo_all), enabled=show_progress) as advance:
            advance(len(todo_all) - len(todo))
            for start in range(0, len(todo), mem.batch_size):
                idx = todo[start:start + mem.batch_size]
                try:
                    batch = explain_batch(engine, ds, idx, cfg, run_dir)
                except RunError as exc:
                    if getattr(exc, "unfinished", None) is not None:
                        store.set_unfinished(exc.unfinished)
                    raise
                except Exception as exc:
                    if is_out_of_memory(exc):  # the estimate was short: one clear stop, resumable
                        raise MemoryLimitError(
                            f"out of memory on a batch of {len(idx)} images ({exc.__class__.__name__}); the "
                            f"results so far are kept", hint="run again with a lower --max-memory or --batch-size "
                            "to resume with smaller batches") from None
                    raise
                store.add(batch.records, batch.corrected, batch.originals, batch.seconds)
                advance(len(idx))
        summary = summarize_run(cfg, ds, preds, store, engine.summary, engine.oracle.stats())
    _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    write_report(run_dir)
    return summary
