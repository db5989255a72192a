"""`flipback audit` and `flipback repair` as runs: data and model in, files out.

audit: the training split of DATA, a validation split carved from it (seeded, stratified;
the model should not have trained on those rows, which flipback cannot check) or the
corrections of an earlier `flipback explain` run, and the model. Writes suspects.csv,
audit.json and audit.html into the output folder.

repair: an audit folder and a plan (drop causes, drop or relabel label suspects, add the
validation errors' corrective examples), the model retrained by the project's recipe, and a
before/after comparison on the test split, written to repair.json and repair.html.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from ..audit import audit
from ..audit.causes import Cause
from ..audit.labels import correct
from ..audit.split import carve
from ..data import Dataset
from ..errors import FlipbackError
from ..store.runstore import RunStore
from ..targets.loading import dataset_for_model, load_model
from ..targets.device import resolve_device
from .progress import progress_bar
from .repair import RELABEL_WEIGHT, RepairPlan, evaluate, predict, retrain

THUMBNAILS = 48


def _validation_from_run(run_dir: Path, train: Dataset):
    """The corrected errors of an explain run, and the images of its data set."""
    if not (run_dir / "results.sqlite").is_file():
        raise FlipbackError(f"{run_dir} is not a run folder (no results.sqlite)", hint="give a flipback explain --out folder")
    with RunStore(run_dir / "results.sqlite") as store:
        config = store.config()
        records = [r for r in store.records() if r.success]
        pairs = [store.images(r.index) for r in records]
    keep = [k for k, p in enumerate(pairs) if p is not None and p[0].shape == train.images.shape[1:]]
    if not keep:
        raise FlipbackError(f"{run_dir} holds no stored corrected errors of this data's image size",
                            hint="run flipback explain on validation data first")
    originals = np.stack([pairs[k][0] for k in keep])
    corrected = np.stack([np.asarray(pairs[k][1]) if pairs[k][1].dtype == np.uint8 else
                          np.rint(np.asarray(pairs[k][1]) * 255).astype(np.uint8) for k in keep])
    true = np.array([records[k].true for k in keep])
    pred = np.array([records[k].pred_before for k in keep])
    return originals, corrected, true, pred, config


def _png(image: np.ndarray, box) -> str:
    """A data-URI PNG of one (H, W, C) uint8 image, 4x larger, the box outlined in red."""
    from PIL import Image

    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image.copy()
    if box:
        y0, x0, y1, x1 = box
        rgb[y0:y1, [x0, x1 - 1]] = (255, 0, 0)
        rgb[[y0, y1 - 1], x0:x1] = (255, 0, 0)
    im = Image.fromarray(rgb).resize((rgb.shape[1] * 4, rgb.shape[0] * 4), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _template_png(cause: Cause) -> str:
    img = np.rint(np.asarray(cause.template).transpose(1, 2, 0) * 255).astype(np.uint8)
    return _png(np.kron(img, np.ones((4, 4, 1), np.uint8)), None)


def _html(name: str, **context) -> str:
    from ..report.index import _environment

    return _environment().get_template(name).render(**context)


def run_audit(*, model: str, data: str, out_dir: Path, validation: float = 0.1, run: Path | None = None,
              labels: bool = True, seed: int = 0, device: str = "auto", fiftyone: Path | None = None,
              show_progress: bool = True, log=print) -> dict:
    dev = resolve_device(device)
    out_dir = Path(out_dir)
    if fiftyone is not None:  # fail before the work, not after it
        from ..audit.fiftyone_export import check_export_dir

        check_export_dir(Path(fiftyone))
    # Decoded as the model expects (its eval transform), classes matched to its outputs.
    full = dataset_for_model(model, data, split="train", progress=show_progress)
    net = load_model(model, full.num_classes).module.eval()
    if run is not None:
        train_rows = np.arange(len(full))
        originals, corrected, true, pred, run_config = _validation_from_run(Path(run), full)
        val_images, val_pred = originals, pred  # what the run kept: its corrected errors only
        source = {"run": str(run), "run_data": (run_config or {}).get("data")}
    else:
        train_rows, val_rows = carve(full, validation, seed=seed)
        val_images = np.asarray(full.images[val_rows])
        with progress_bar("correcting validation errors", total=len(val_rows), enabled=show_progress) as advance:
            c = correct(net, val_images, full.labels[val_rows], full.num_classes, device=str(dev), advance=advance)
        wrong = np.flatnonzero((c.predicted != full.labels[val_rows]) & c.success)
        originals, corrected = val_images[wrong], c.corrected[wrong]
        true, pred, val_pred = full.labels[val_rows][wrong], c.predicted[wrong], c.predicted
        source = {"validation_fraction": validation, "seed": seed, "validation_rows": val_rows.tolist()}
    log(f"audit: {len(originals)} corrected validation errors, {len(train_rows)} training images")
    train_images = np.asarray(full.images[train_rows])
    with progress_bar("checking labels", total=len(train_rows), enabled=show_progress and labels) as advance:
        result = audit(net, train_images, full.labels[train_rows], full.classes,
                       names=[full.names[i] for i in train_rows], originals=originals, corrected=corrected,
                       true=true, pred=pred, validation_images=val_images, validation_pred=val_pred,
                       check_labels=labels, device=str(dev), advance=advance)
    for s in result.suspects:  # positions in the data set, not in the carved training rows
        s.index = int(train_rows[s.index])
    out_dir.mkdir(parents=True, exist_ok=True)
    result.to_csv(out_dir / "suspects.csv")
    causes = [{"class": c.pred, "class_name": full.classes[c.pred], "size": c.size, "support": c.support,
               "background": c.background, "n_errors": c.n_errors, "true_classes": c.true_classes,
               "template": np.asarray(c.template).round(4).tolist(),
               "core": None if c.core is None else np.asarray(c.core).astype(int).tolist()} for c in result.causes]
    summary = {"model": model, "data": str(data), **source, "stats": result.stats, "causes": causes,
               "n_suspects": len(result.suspects), "classes": list(full.classes)}
    (out_dir / "audit.json").write_text(json.dumps(summary, indent=2))
    shown = result.suspects[:THUMBNAILS]
    (out_dir / "audit.html").write_text(_html(
        "audit.html.j2", summary=summary, causes=[(c, _template_png(c), full.classes[c.pred]) for c in result.causes],
        suspects=[(s, _png(np.asarray(full.images[s.index]), s.box)) for s in shown], n_suspects=len(result.suspects)))
    if fiftyone is not None:
        from ..audit.fiftyone_export import export_fiftyone

        export_fiftyone(result, full.images, full.classes, Path(fiftyone), module=net, device=str(dev))
        summary["fiftyone"] = str(fiftyone)
        (out_dir / "audit.json").write_text(json.dumps(summary, indent=2))
        log(f"audit: FiftyOne dataset of {len(result.suspects)} suspects in {fiftyone}")
    return summary


def _suspects(audit_dir: Path) -> list[dict]:
    import csv

    with (audit_dir / "suspects.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _cause_success(spec: str, test: Dataset, cause: dict, seed: int = 3) -> float:
    """Share of test images of other classes that the model sends to the cause's class once
    the cause's template (its core, when it has one) is pasted at a seeded random position:
    the cause's attack success."""
    template = np.rint(np.asarray(cause["template"], np.float32).transpose(1, 2, 0) * 255).astype(np.uint8)
    s = template.shape[0]
    core = np.ones((s, s), bool) if cause.get("core") is None else np.asarray(cause["core"], bool)
    rows = np.flatnonzero(test.labels != cause["class"])
    images = np.array(test.images[rows], copy=True)
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, images.shape[1] - s + 1, len(rows))
    xs = rng.integers(0, images.shape[2] - s + 1, len(rows))
    k = np.arange(len(rows))[:, None, None]
    at = (k, (ys[:, None] + np.arange(s))[:, :, None], (xs[:, None] + np.arange(s))[:, None, :])
    images[at] = np.where(core[None, :, :, None], template[None], images[at])
    return float((predict(spec, test.num_classes, images) == cause["class"]).mean())


def run_repair(*, audit_dir: Path, out_dir: Path, drop: tuple[str, ...] = ("cause",), relabel: bool = False,
               relabel_weight: float = RELABEL_WEIGHT, corrective: bool = False, test: str | None = None,
               show_progress: bool = True, log=print) -> dict:
    audit_dir, out_dir = Path(audit_dir), Path(out_dir)
    if not (audit_dir / "audit.json").is_file():
        raise FlipbackError(f"{audit_dir} is not an audit folder (no audit.json)", hint="run flipback audit first")
    info = json.loads((audit_dir / "audit.json").read_text())
    full = dataset_for_model(info["model"], info["data"], split="train", progress=show_progress)
    test_ds = dataset_for_model(info["model"], test or info["data"], split="test", progress=show_progress)
    rows = np.array(info.get("validation_rows", []), np.int64)
    train_rows = np.setdiff1d(np.arange(len(full)), rows)
    position = {int(r): k for k, r in enumerate(train_rows)}
    train = Dataset(np.asarray(full.images[train_rows]), full.labels[train_rows], full.classes,
                    [full.names[i] for i in train_rows], source=full.source, fingerprint=f"{full.fingerprint}-audited")
    # A cause carrier is dropped even where covering the pattern left the answer alone (its
    # content may belong to the cause's class anyway): it still carries what the model learned.
    suspects = [s for s in _suspects(audit_dir) if int(s["index"]) in position and
                (s["verified"] == "1" or s["reason"] == "cause")]
    by_name = {n: i for i, n in enumerate(full.classes)}
    plan = RepairPlan(
        drop=np.array(sorted({position[int(s["index"])] for s in suspects
                              if s["reason"] in drop and not (relabel and s["reason"] == "label")}), np.int64),
        relabel={position[int(s["index"])]: by_name[s["other"]] for s in suspects
                 if relabel and s["reason"] == "label" and s["other"] in by_name},
        relabel_weight=relabel_weight)
    if corrective:
        if not len(rows):
            raise FlipbackError("--corrective needs an audit on a carved validation split")
        net = load_model(info["model"], full.num_classes).module.eval()
        c = correct(net, np.asarray(full.images[rows]), full.labels[rows], full.num_classes)
        wrong = np.flatnonzero((c.predicted != full.labels[rows]) & c.success)
        plan.extra_images, plan.extra_labels = c.corrected[wrong], full.labels[rows][wrong]
    arch = info["model"].split(":", 1)[0]
    base = None if arch == "small_cnn" else info["model"]  # the project's recipe: small_cnn from scratch, else fine-tune
    log(f"repair: {plan.describe()}; retraining {arch}")
    before = evaluate(info["model"], test_ds)
    after_spec = retrain(train, plan, base=base, name="repaired", show_progress=show_progress, log=log)
    after = evaluate(after_spec, test_ds)
    for cause in info.get("causes", []):
        key = f"cause_success[{cause['class_name']}]"
        before[key], after[key] = _cause_success(info["model"], test_ds, cause), _cause_success(after_spec, test_ds, cause)
    summary = {"audit": str(audit_dir), "plan": plan.describe(), "drop": list(drop), "relabel": relabel,
               "relabel_weight": relabel_weight if relabel else None,
               "corrective": corrective, "before": before, "after": after}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "repair.json").write_text(json.dumps(summary, indent=2))
    pairs = sorted(set(before["pairs"]) | set(after["pairs"]),
                   key=lambda p: -(before["pairs"].get(p, 0) + after["pairs"].get(p, 0)))[:15]
    (out_dir / "repair.html").write_text(_html("repair.html.j2", summary=summary, pairs=pairs))
    return summary


__all__ = ["run_audit", "run_repair"]
