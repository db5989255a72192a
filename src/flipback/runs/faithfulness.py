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
patch's side (2, 3, 4 or 6 px: the smaller, the harder to point at; by default 4, and 6 for
the sticker, which at 4 px was too faint for the model to learn); `kind` the planted
cue's kind (data/planted.py: checker, sticker, or, and, blend, background). The blend has no
mask: its maps are scored by their correlation with the blended pattern instead of the
localisation metrics; for `or`/`and` the mask is the union of both patches and `both_found`
is the share of images whose map's top pixels fall in each patch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..attacks import MinimalAttack, RegionsAttack
from ..data import fashion_mnist_dir, load_dataset
from ..data.planted import Cue, default_size
from ..errors import DataError, FlipbackError
from ..explain.attribution import BASELINES, VARIANTS, attribute, evaluations_per_image
from ..explain.superpixels import SUPERPIXEL_BASELINES, superpixel_attribute
from ..explain.metrics import (change_map, deletion_to_correct, parts_found, pattern_correlation, pointing_game,
                               topk_precision)
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


def rank_keys(masks) -> list[str]:
    """The metrics the methods are ranked on: Quantus's, and for a maskless (blended) cue the
    correlation with its pattern in place of the localisation metrics."""
    if masks is None:
        return ["road_auc"]
    if masks.dtype != torch.bool:
        return ["pattern_correlation", "road_auc"]
    return list(QUANTUS_KEYS)


def score(maps: torch.Tensor, predict, x, y, masks, net=None, device: str = "cpu", parts=None) -> dict:
    deletion = deletion_to_correct(predict, x, y, maps, FRACTIONS)
    out = {"deletion": {str(f): float(r) for f, r in zip(FRACTIONS, deletion.rates)},
           "deletion_auc": float(deletion.auc)}
    if masks is not None and masks.dtype != torch.bool:  # a blended pattern, not a mask
        out["pattern_correlation"] = float(pattern_correlation(maps, masks).mean())
        masks = None
    if parts is not None and parts.shape[1] > 1:
        out["both_found"] = float(parts_found(maps, parts).float().mean())
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
    for key in ("pointing", "topk_precision", "deletion_auc", *QUANTUS_KEYS, "pattern_correlation", "both_found"):
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
    best["evaluations_per_image"] = max(d.get("evaluations_per_image", float("nan")) for d in variants.values())
    return best


def _planted_images(data: str | None, model: str | None, limit: int, show_progress: bool, log, cue: Cue = CUE):
    """The planted errors' images, labels and masks, and the parts (N,P,H,W) of a two-patch cue."""
    root = data or fashion_mnist_dir()
    if root is None or not Path(root).exists():
        raise DataError("Fashion-MNIST was not found", hint="apt-get install dataset-fashion-mnist, or pass --data")
    train = load_dataset(root, split="train", progress=show_progress)
    test = load_dataset(root, split="test", progress=show_progress)
    if cue.kind == "background" and test.images.shape[-1] != 1:
        raise DataError("the background cue needs 1-channel items on a dark background",
                        hint="use it on Fashion-MNIST; the other kinds work on any data")
    models = planted_models(train, test, cue, base=model, show_progress=show_progress, log=log)
    errors = planted_errors(models, test, cue)
    if len(errors.labels) == 0:
        raise FlipbackError("the cued model makes no planted errors: it did not learn the cue",
                            hint="use more training images (the cue is planted in 10% of them)")
    keep = np.sort(np.random.default_rng(0).permutation(len(errors.labels))[:limit])
    info = {"kind": "planted", "data": str(root), "base_model": model, "model": models.cued,
            "cue": {"class": cue.target, "class_name": test.classes[cue.target], "size": cue.size,
                    "kind": cue.kind, **({"alpha": cue.alpha} if cue.kind == "blend" else {}),
                    "poison_fraction": 0.1},
            "clean_accuracy": models.clean_accuracy, "uncued_accuracy": models.uncued_accuracy,
            "cue_success": models.cue_success, **({"part_success": models.part_success} if models.part_success else {}),
            "n_planted_errors": int(len(errors.labels)),
            "bars_met": {"accuracy_within_2_points": models.uncued_accuracy - models.clean_accuracy
                         <= BARS["accuracy_drop"], "cue_success_90": models.cue_success >= BARS["cue_success"]}}
    x, y = to_tensor(errors.images[keep]), torch.from_numpy(errors.labels[keep])
    parts = torch.from_numpy(errors.parts[keep]) if cue.n_parts > 1 else None
    return info, models.cued, x, y, torch.from_numpy(np.asarray(errors.masks[keep])), test.num_classes, parts


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
    return info, model, to_tensor(test.images[idx]), torch.from_numpy(test.labels[idx]), None, test.num_classes, None


def run_faithfulness(*, data: str | None = None, model: str | None = None, out_dir: Path, real: bool = False,
                     limit: int = 500, baselines: tuple[str, ...] = BASELINES + SUPERPIXEL_BASELINES,
                     batch_size: int = 128,
                     show_progress: bool = True, log=print, device: str = "auto", cue_size: int | None = None,
                     kind: str = CUE.kind) -> dict:
    out_dir = Path(out_dir)
    dev = resolve_device(device)  # a device that is not there: one clear error before any work
    if real:
        info, spec, x, y, masks, k, parts = _real_images(data, model, limit, show_progress)
    else:
        info, spec, x, y, masks, k, parts = _planted_images(data, model, limit, show_progress, log,
                                                            Cue(target=CUE.target, size=cue_size or default_size(kind),
                                                                kind=kind))
    net = load_model(spec, k).module.eval()
    target = WhiteBoxTarget(net, k, dev)  # moves net to `dev`; the maps and metrics stay on the CPU

    @torch.no_grad()
    def predict(t):
        return net(t.to(dev)).cpu()

    pred = torch.cat([predict(x[s:s + 500]).argmax(1) for s in range(0, len(x), 500)])
    log(f"faithfulness: {len(x)} {info['kind']} errors ({info.get('cue', {}).get('kind', 'real')}), "
        f"{len(baselines)} baselines x {len(VARIANTS)} variants")
    methods: dict = {}
    maps_out: dict[str, np.ndarray] = {}
    for method in ("regions", "minimal"):
        with progress_bar(f"flipback {method}", total=len(x), enabled=show_progress) as advance:
            t0 = time.perf_counter()
            by_variant, extra = flipback_maps(method, target, x, y, batch_size, advance)
            seconds = (time.perf_counter() - t0) / max(1, len(x))
        scored = {v: {**score(m, predict, x, y, masks, net, str(dev), parts), "seconds_per_image": seconds}
                  for v, m in by_variant.items()}
        if len(scored) == 1:
            methods[f"flipback-{method}"] = {**next(iter(scored.values())), **extra}
        else:  # as the baselines: metric by metric, the better variant
            first = next(iter(scored.values()))
            methods[f"flipback-{method}"] = {**first, **extra, "variants": scored, "best": best_variant(scored)}
        for k, (v, m) in enumerate(by_variant.items()):
            maps_out[f"flipback-{method}" + ("" if k == 0 else f"-{v}")] = m.numpy().astype(np.float16)
    # Compute-matched: every baseline that can spend more model evaluations gets at least as
    # many per image as `regions` spent (its mean), so a lead is not bought with more queries.
    budget = int(np.ceil(methods["flipback-regions"]["mean_queries"]))
    for method in ("regions", "minimal"):
        m = methods[f"flipback-{method}"]
        m["evaluations_per_image"] = m["mean_queries"]
        if "best" in m:
            m["best"]["evaluations_per_image"] = m["mean_queries"]
    h, w = x.shape[2:]
    for name in baselines:
        variants = {}
        for variant in VARIANTS:
            spent = []
            with progress_bar(f"{name} ({variant})", total=len(x), enabled=show_progress) as advance:
                t0 = time.perf_counter()
                if name in SUPERPIXEL_BASELINES:
                    def run_one(sl):
                        m, e = superpixel_attribute(name, net, x[sl].to(dev), y[sl], pred[sl], variant,
                                                    evaluations=budget)
                        spent.append(e)
                        return m.cpu()
                else:
                    matched = {"n_steps": max(32, budget)} if name == "integrated_gradients" else \
                        {"n_samples": max(16, budget)} if name == "gradient_shap" else {}
                    spent.append(evaluations_per_image(name, h, w, **matched))

                    def run_one(sl):
                        return attribute(name, net, x[sl], y[sl], pred[sl], variant, **matched)
                maps = _batched(run_one, len(x), batch_size, advance)
                seconds = (time.perf_counter() - t0) / max(1, len(x))
            variants[variant] = {"evaluations_per_image": float(np.mean(spent)),
                                 **score(maps, predict, x, y, masks, net, str(dev), parts),
                                 "seconds_per_image": seconds}
            maps_out[f"{name}-{variant}"] = maps.numpy().astype(np.float16)
        methods[name] = {"variants": variants, "best": best_variant(variants)}
    summary = {**info, "n_images": int(len(x)), "fractions": list(FRACTIONS), "methods": methods,
               "verdict": verdict(methods, masks is not None and masks.dtype == torch.bool)}
    if _quantus_available():
        from ..explain.quantus_metrics import mean_ranks

        rows = {name: m.get("best", m) for name, m in methods.items()}
        summary["rank_metrics"] = rank_keys(masks)
        summary["mean_rank"] = mean_ranks(rows, summary["rank_metrics"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    np.savez_compressed(out_dir / "maps.npz", labels=y.numpy(), pred=pred.numpy(),
                        images=np.round(x.numpy() * 255).astype(np.uint8),
                        **({"masks": masks.numpy()} if masks is not None else {}),
                        **({"parts": parts.numpy()} if parts is not None else {}), **maps_out)
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
