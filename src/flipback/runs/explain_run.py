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
from ..data import Dataset, load_dataset
from ..errors import FlipbackError, ModelError
from ..explain import explain_changes, save_figure
from ..report import write_report
from ..store import RunStore
from ..targets.blackbox import BudgetExceeded as BudgetExceededError
from ..targets.surrogate import as_probabilities
from .errors import Predictions, predict_dataset, to_tensor
from .progress import progress_bar
from .session import Session, black_box_session, white_box_session


@contextmanager
def session_closed(session: Session):
    try:
        yield session
    finally:
        session.close()


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
    seed: int = 0
    trust_model: bool = False
    figures: bool = True
    batch_size: int = 256
    surrogate: str | None = None  # black-box mode: the surrogate file
    output: str = "scores"  # black-box mode: the target returns "scores" or only a top-1 "label"
    options: dict = field(default_factory=dict)  # extra attack options, e.g. {"step": 2/255}

    def identity(self, data_fingerprint: str, model_fingerprint: str) -> dict:
        """What must match for a run folder to be resumed."""
        keep = ("model", "mode", "method", "pixels", "budget", "split", "limit", "mean", "std", "seed", "options",
                "surrogate", "output")
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


def attack_options(cfg: ExplainConfig) -> dict:
    opts = {"pixels": cfg.pixels, **cfg.options}
    if cfg.budget is not None:
        opts["max_steps" if cfg.method == "paper" else "max_queries"] = cfg.budget
    return opts


def _probabilities(scores: torch.Tensor) -> list[list[float]]:
    """Logits (white-box) or the target's scores (black-box) as rounded probabilities."""
    return [[round(float(p), 6) for p in row] for row in as_probabilities(torch.nan_to_num(scores))]


def _records(ds: Dataset, idx: np.ndarray, result: AttackResult, before: torch.Tensor,
             explanations, figure_paths, image_paths) -> list[dict]:
    labels = ds.labels[idx]
    after_pred = torch.nan_to_num(result.logits, nan=-1e30).argmax(1).numpy()
    prob_before, prob_after = _probabilities(before), _probabilities(result.logits)
    out = []
    for j, i in enumerate(idx):
        e = explanations[j]
        ok = bool(result.success[j])
        pb, pa = int(before[j].argmax()), int(after_pred[j])
        out.append({
            "index": int(i), "name": ds.names[i],
            "true": int(labels[j]), "pred_before": pb, "pred_after": pa,
            "true_name": ds.classes[labels[j]], "pred_before_name": ds.classes[pb],
            "pred_after_name": ds.classes[pa],
            "success": ok, "queries": int(result.queries[j]),
            **{k: e.to_dict()[k] for k in ("l2", "linf", "l0", "frac_changed", "regions")},
            "n_regions": len(e.regions), "region_fraction": float(sum(r.area for r in e.regions)) / e.heatmap.size,
            "scores_before": prob_before[j], "scores_after": prob_after[j],
            "figure": figure_paths[j], "corrected_image": image_paths[j], "error": None,
        })
    return out


def _save_images(run_dir: Path, ds: Dataset, idx, originals, corrected, explanations, before, result,
                 cfg: ExplainConfig):
    figure_paths, image_paths = [], []
    after_pred = torch.nan_to_num(result.logits, nan=-1e30).argmax(1)
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
                        scores_after=as_probabilities(torch.nan_to_num(result.logits[j:j + 1]))[0].numpy())
            figure_paths.append(f"figures/{name}")
        else:
            figure_paths.append(None)
    return figure_paths, image_paths


def _attack_batch(session: Session, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray):
    """Attack a batch; if it breaks, retry image by image so one bad image costs only itself.
    Whole-run problems (a spent total budget, a model that cannot be used) stop the run."""
    try:
        return session.attack(x, y, idx), [None] * len(x)
    except (ModelError, BudgetExceededError):
        raise
    except Exception:
        results, errors = [], []
        for k in range(len(x)):
            try:
                results.append(session.attack(x[k:k + 1], y[k:k + 1], idx[k:k + 1]))
                errors.append(None)
            except (ModelError, BudgetExceededError):
                raise
            except Exception as exc:  # recorded against this image, the run goes on
                n = session.num_classes
                results.append(AttackResult(x[k:k + 1].clone(), torch.zeros(1, dtype=torch.bool),
                                            torch.zeros(1, dtype=torch.long), torch.full((1, n), float("nan"))))
                errors.append(f"{type(exc).__name__}: {exc}")
        return AttackResult(*(torch.cat([getattr(r, f) for r in results]) for f in
                              ("corrected", "success", "queries", "logits"))), errors


def summarize(cfg: ExplainConfig, ds: Dataset, preds: Predictions, records: list[dict], seconds: float) -> dict:
    ok = [r for r in records if r["success"]]
    q = np.array([r["queries"] for r in records], dtype=float)
    qs = np.array([r["queries"] for r in ok], dtype=float)

    def stat(f, key, rows):
        vals = np.array([r[key] for r in rows], dtype=float)
        return float(f(vals)) if len(vals) else None

    errors = preds.misclassified
    return {
        "mode": cfg.mode, "method": cfg.method, "model": cfg.model, "data": cfg.data, "split": cfg.split,
        "pixels": cfg.pixels, "budget": cfg.budget,
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
        "median_regions": stat(np.median, "n_regions", [r for r in ok if "n_regions" in r]),
        "median_region_fraction": stat(np.median, "region_fraction", [r for r in ok if "region_fraction" in r]),
        "n_failed_with_error": sum(1 for r in records if r.get("error")),
        "seconds": seconds, "images_per_second": len(records) / seconds if seconds > 0 else None,
        "classes": ds.classes, "confusion": preds.confusion(ds.num_classes).tolist(),
    }


def run_explain(cfg: ExplainConfig, run_dir: Path, *, show_progress: bool = True, resume: bool = True,
                log=print) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.mode not in ("white-box", "black-box"):
        raise FlipbackError(f"unknown mode '{cfg.mode}'", hint="use --mode white-box or --mode black-box")
    ds = load_dataset(cfg.data, split=cfg.split, progress=show_progress)
    make_session = white_box_session if cfg.mode == "white-box" else black_box_session
    session = make_session(cfg, ds, attack_options(cfg))
    run_dir = Path(run_dir)
    identity = cfg.identity(ds.fingerprint, file_fingerprint(cfg.model) + file_fingerprint(cfg.surrogate or ""))
    with session_closed(session), RunStore.open(run_dir, identity, resume=resume) as store:
        preds = predict_dataset(session.scores, ds, show_progress=show_progress)
        todo_all = preds.misclassified[: cfg.limit] if cfg.limit is not None else preds.misclassified
        done = store.done()
        todo = np.array([i for i in todo_all if int(i) not in done], dtype=np.int64)
        if done:
            log(f"resuming: {len(done)} of {len(todo_all)} errors already explained")
        with progress_bar(f"explaining ({cfg.method})", total=len(todo_all), enabled=show_progress) as advance:
            advance(len(todo_all) - len(todo))
            for start in range(0, len(todo), cfg.batch_size):
                idx = todo[start:start + cfg.batch_size]
                images = ds.images[idx]
                x, y = to_tensor(images), torch.from_numpy(ds.labels[idx])
                t0 = time.perf_counter()
                before = session.scores(x)
                result, errors = _attack_batch(session, x, y, idx)
                seconds = time.perf_counter() - t0
                originals = x.permute(0, 2, 3, 1).numpy()
                corrected = result.corrected.permute(0, 2, 3, 1).numpy()
                ranks = None if result.regions is None else result.regions.numpy()
                gain = None if result.importance is None else result.importance.numpy()
                explanations = explain_changes(originals, corrected, region_ranks=ranks, region_gain=gain)
                fig_paths, img_paths = _save_images(run_dir, ds, idx, originals, corrected, explanations,
                                                    before, result, cfg)
                records = _records(ds, idx, result, before, explanations, fig_paths, img_paths)
                for rec, err in zip(records, errors):
                    rec["error"] = err
                stored = np.round(corrected * 255).astype(np.uint8) if cfg.pixels == "uint8" else corrected
                store.add(records, stored, images, seconds)
                advance(len(idx))
        records = store.records()
        summary = summarize(cfg, ds, preds, records, store.seconds())
        summary.update(session.summary)
        if "surrogate_queries" in summary and records:
            summary["surrogate_queries_per_image"] = summary["surrogate_queries"] / len(records)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(run_dir)
    return summary
