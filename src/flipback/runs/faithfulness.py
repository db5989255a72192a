"""`flipback bench faithfulness`: do explanations point at the real cause of an error?

Two kinds of benchmark, on exactly the same images for every method:

- planted (default): a model trained with a small cue patch tied to one class (BadNets);
  cued test images of other classes that it gets right without the cue and wrong with it.
  The cause is known, the patch mask, so the pointing game and top-k precision apply.
- real (`--real`): the model's own test-set errors; no known cause, so only
  deletion-to-correct (does removing the top pixels fix the error?) applies.

flipback's entries are the `regions` method (its ranked regions, pixels by their share of
the margin gained) and the `minimal` method's change magnitude. Each Captum baseline runs
for the predicted class and for the predicted-minus-true difference; the `best` table
takes, metric by metric, the better of the two, so baselines are never shown at their worst.

With the `quantus` extra installed, every map is also scored by metrics flipback did not
write (explain/quantus_metrics.py): Quantus's pointing game, relevance rank accuracy and
relevance mass accuracy on planted causes, and ROAD (noisy linear imputation, not a blur)
everywhere; `mean_rank` ranks the methods over those (issue 14). `cue_size` sets the planted
patch's side (2, 3, 4 or 6 px: the smaller, the harder to point at).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..attacks import MinimalAttack, RegionsAttack
from ..data import fashion_mnist_dir, load_dataset
from ..data.planted import Cue
from ..errors import DataError, FlipbackError
from ..explain.attribution import BASELINES, VARIANTS, attribute
from ..explain.metrics import change_map, deletion_to_correct, pointing_game, topk_precision
from ..targets.device import resolve_device
from ..targets.loading import load_model
from ..targets.whitebox import WhiteBoxTarget
from .errors import predict_dataset, to_tensor
from .planted import planted_errors, planted_models
from .progress import progress_bar

FRACTIONS = (0.01, 0.02, 0.05, 0.10)
CUE = Cue(target=0, size=4)
BARS = {"accuracy_drop": 0.02, "cue_success": 0.90}


def _batched(fn, n: int, batch_size: int, advance) -> torch.Tensor:
    parts = []
    for s in range(0, n, batch_size):
        parts.append(fn(slice(s, min(n, s + batch_size))))
        advance(min(n, s + batch_size) - s)
    return torch.cat(parts)


def flipback_maps(method: str, target: WhiteBoxTarget, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  advance) -> tuple[dict[str, torch.Tensor], dict]:
    """The maps of a flipback method by variant, and the regions' statistics for `regions`.
    `regions` has two, as each baseline does: its ranking of every pixel (`order`, what the
    deletion metrics read) and each changed pixel's share of the margin gained, zero outside
    the regions (`importance`, a map in the usual sense); `minimal` one, its change."""
    stats: dict = {"success": [], "n_regions": [], "fraction": [], "queries": [], "importance": []}

    def one(sl):
        if method == "regions":
            r = RegionsAttack().run(target, target, x[sl], y[sl])
            stats["n_regions"].append(r.regions.amax((1, 2)).cpu())
            stats["fraction"].append((r.regions > 0).float().mean((1, 2)).cpu())
            stats["importance"].append(r.importance.cpu())
            m = r.order.cpu()
        else:
            r = MinimalAttack().run(target, target, x[sl], y[sl])
            m = change_map(x[sl], r.corrected.cpu())
        stats["success"].append(r.success.cpu())
        stats["queries"].append(r.queries.cpu())
        return m

    first = _batched(one, len(x), batch_size, advance)
    maps = {"order": first, "importance": torch.cat(stats["importance"])} if method == "regions" else \
        {"change": first}
    out = {"success_rate": float(torch.cat(stats["success"]).float().mean()),
           "mean_queries": float(torch.cat(stats["queries"]).float().mean())}
    if method == "regions":
        ok = torch.cat(stats["success"])
        n_regions, fraction = torch.cat(stats["n_regions"])[ok].float(), torch.cat(stats["fraction"])[ok]
        out.update(median_regions=float(n_regions.median()) if len(n_regions) else None,
                   mean_regions=float(n_regions.mean()) if len(n_regions) else None,
                   median_fraction=float(fraction.median()) if len(fraction) else None)
    return maps, out


def _quantus_available() -> bool:
    try:
        import quantus  # noqa: F401
    except ImportError:
        return False
    return True


QUANTUS_KEYS = ("quantus_pointing_game", "quantus_relevance_rank_accuracy", "quantus_relevance_mass_accuracy",
                "road_auc")


def score(maps: torch.Tensor, predict, x, y, masks, net=None, device: str = "cpu") -> dict:
    deletion = deletion_to_correct(predict, x, y, maps, FRACTIONS)
    out = {"deletion": {str(f): float(r) for f, r in zip(FRACTIONS, deletion.rates)},
           "deletion_auc": float(deletion.auc)}
    if masks is not None:
        out["pointing"] = float(pointing_game(maps, masks).float().mean())
        out["topk_precision"] = float(topk_precision(maps, masks).mean())
    if net is not None and _quantus_available():
        from ..explain.quantus_metrics import ROAD_PERCENTAGES, localisation, road, road_auc

        if masks is not None:
            for name, values in localisation(maps, masks).items():
                out[f"quantus_{name}"] = float(np.nanmean(values))
        curve = road(net, x, y.numpy(), maps, ROAD_PERCENTAGES, device=device)
        out["road"] = {str(p): v for p, v in curve.items()}
        out["road_auc"] = road_auc(curve)
    return out


def best_variant(variants: dict) -> dict:
    """Metric by metric, the better of a baseline's variants (and which one it was)."""
    best: dict = {}
    for key in ("pointing", "topk_precision", "deletion_auc", *QUANTUS_KEYS):
        vals = {v: d[key] for v, d in variants.items() if key in d}
        if vals:
            v = max(vals, key=vals.get)
            best[key], best[f"{key}_variant"] = vals[v], v
    auc_variant = best.get("deletion_auc_variant")
    if auc_variant:
        best["deletion"] = variants[auc_variant]["deletion"]
    road_variant = best.get("road_auc_variant")
    if road_variant:
        best["road"] = variants[road_variant]["road"]
    best["seconds_per_image"] = max(d["seconds_per_image"] for d in variants.values())
    return best


def _planted_images(data: str | None, model: str | None, limit: int, show_progress: bool, log, cue: Cue = CUE):
    root = data or fashion_mnist_dir()
    if root is None or not Path(root).exists():
        raise DataError("Fashion-MNIST was not found", hint="apt-get install dataset-fashion-mnist, or pass --data")
    train = load_dataset(root, split="train", progress=show_progress)
    test = load_dataset(root, split="test", progress=show_progress)
    models = planted_models(train, test, cue, base=model, show_progress=show_progress, log=log)
    errors = planted_errors(models, test, cue)
    if len(errors.labels) == 0:
        raise FlipbackError("the cued model makes no planted errors: it did not learn the cue",
                            hint="use more training images (the cue is planted in 10% of them)")
    keep = np.sort(np.random.default_rng(0).permutation(len(errors.labels))[:limit])
    info = {"kind": "planted", "data": str(root), "base_model": model, "model": models.cued,
            "cue": {"class": cue.target, "class_name": test.classes[cue.target], "size": cue.size,
                    "poison_fraction": 0.1},
            "clean_accuracy": models.clean_accuracy, "uncued_accuracy": models.uncued_accuracy,
            "cue_success": models.cue_success, "n_planted_errors": int(len(errors.labels)),
            "bars_met": {"accuracy_within_2_points": models.uncued_accuracy - models.clean_accuracy
                         <= BARS["accuracy_drop"], "cue_success_90": models.cue_success >= BARS["cue_success"]}}
    x, y = to_tensor(errors.images[keep]), torch.from_numpy(errors.labels[keep])
    return info, models.cued, x, y, torch.from_numpy(errors.masks[keep]), test.num_classes


def _real_images(data: str | None, model: str | None, limit: int, show_progress: bool):
    if not data or not model:
        raise FlipbackError("--real needs --data and --model", hint="e.g. --data cifar10 --model cifar_resnet20:w.th")
    test = load_dataset(data, split="test", progress=show_progress)
    net = load_model(model, test.num_classes).module.eval()
    with torch.no_grad():
        preds = predict_dataset(net, test, show_progress=show_progress)
    idx = preds.misclassified[:limit]
    if len(idx) == 0:
        raise FlipbackError("the model makes no errors on this data: nothing to explain")
    info = {"kind": "real", "data": str(data), "model": model, "accuracy": preds.accuracy,
            "n_errors": int(len(preds.misclassified))}
    return info, model, to_tensor(test.images[idx]), torch.from_numpy(test.labels[idx]), None, test.num_classes


def run_faithfulness(*, data: str | None = None, model: str | None = None, out_dir: Path, real: bool = False,
                     limit: int = 500, baselines: tuple[str, ...] = BASELINES, batch_size: int = 128,
                     show_progress: bool = True, log=print, device: str = "auto", cue_size: int = CUE.size) -> dict:
    out_dir = Path(out_dir)
    dev = resolve_device(device)  # a device that is not there: one clear error before any work
    if real:
        info, spec, x, y, masks, k = _real_images(data, model, limit, show_progress)
    else:
        info, spec, x, y, masks, k = _planted_images(data, model, limit, show_progress, log,
                                                     Cue(target=CUE.target, size=cue_size))
    net = load_model(spec, k).module.eval()
    target = WhiteBoxTarget(net, k, dev)  # moves net to `dev`; the maps and metrics stay on the CPU

    @torch.no_grad()
    def predict(t):
        return net(t.to(dev)).cpu()

    pred = torch.cat([predict(x[s:s + 500]).argmax(1) for s in range(0, len(x), 500)])
    log(f"faithfulness: {len(x)} {info['kind']} errors, {len(baselines)} baselines x {len(VARIANTS)} variants")
    methods: dict = {}
    maps_out: dict[str, np.ndarray] = {}
    for method in ("regions", "minimal"):
        with progress_bar(f"flipback {method}", total=len(x), enabled=show_progress) as advance:
            t0 = time.perf_counter()
            by_variant, extra = flipback_maps(method, target, x, y, batch_size, advance)
            seconds = (time.perf_counter() - t0) / max(1, len(x))
        scored = {v: {**score(m, predict, x, y, masks, net, str(dev)), "seconds_per_image": seconds}
                  for v, m in by_variant.items()}
        if len(scored) == 1:
            methods[f"flipback-{method}"] = {**next(iter(scored.values())), **extra}
        else:  # as the baselines: metric by metric, the better variant
            first = next(iter(scored.values()))
            methods[f"flipback-{method}"] = {**first, **extra, "variants": scored, "best": best_variant(scored)}
        for k, (v, m) in enumerate(by_variant.items()):
            maps_out[f"flipback-{method}" + ("" if k == 0 else f"-{v}")] = m.numpy().astype(np.float16)
    for name in baselines:
        variants = {}
        for variant in VARIANTS:
            with progress_bar(f"{name} ({variant})", total=len(x), enabled=show_progress) as advance:
                t0 = time.perf_counter()
                maps = _batched(lambda sl: attribute(name, net, x[sl], y[sl], pred[sl], variant), len(x),
                                batch_size, advance)
                seconds = (time.perf_counter() - t0) / max(1, len(x))
            variants[variant] = {**score(maps, predict, x, y, masks, net, str(dev)), "seconds_per_image": seconds}
            maps_out[f"{name}-{variant}"] = maps.numpy().astype(np.float16)
        methods[name] = {"variants": variants, "best": best_variant(variants)}
    summary = {**info, "n_images": int(len(x)), "fractions": list(FRACTIONS), "methods": methods,
               "verdict": verdict(methods, masks is not None)}
    if _quantus_available():
        from ..explain.quantus_metrics import mean_ranks

        rows = {name: m.get("best", m) for name, m in methods.items()}
        summary["mean_rank"] = mean_ranks(rows, [k for k in QUANTUS_KEYS if masks is not None or k == "road_auc"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    np.savez_compressed(out_dir / "maps.npz", labels=y.numpy(), pred=pred.numpy(),
                        images=np.round(x.numpy() * 255).astype(np.uint8),
                        **({"masks": masks.numpy()} if masks is not None else {}), **maps_out)
    return summary


def verdict(methods: dict, planted: bool) -> dict:
    """Whether flipback's regions beat every baseline's best variant, metric by metric."""
    ours = methods["flipback-regions"].get("best", methods["flipback-regions"])
    keys = ("pointing", "deletion_auc") if planted else ("deletion_auc",)
    out = {}
    for key in keys:
        rivals = {n: m["best"][key] for n, m in methods.items() if "best" in m and not n.startswith("flipback")}
        top = max(rivals, key=rivals.get) if rivals else None
        out[key] = {"flipback": ours[key], "best_baseline": top, "best_baseline_value": rivals.get(top),
                    "flipback_higher": bool(top is None or ours[key] > rivals[top])}
    if planted:
        out["pointing_at_least_95"] = ours["pointing"] >= 0.95
    return out
