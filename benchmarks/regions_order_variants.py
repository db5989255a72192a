"""Validation for `regions`' pixel order (issue 14): alternative orders after the changed
pixels, scored by relevance rank accuracy (and with --road, ROAD AUC) on planted errors that
are not the benchmark's. Never run it on the benchmark's errors.

    python benchmarks/regions_order_variants.py fmnist checker sticker or and background
    python benchmarks/regions_order_variants.py cifar checker sticker or and   # needs ../shared

Errors 61 to 160 of each kind's seeded draw (the faithfulness benchmark explains the draw's
first 60), the benchmark's cached planted models; `regions` runs once per kind and its inputs
to `explanation_order` are recorded, so every variant ranks the same correction. Prints a
Markdown table (docs/benchmarks.md, "A closeness prior, tried and not kept").
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

import flipback.attacks.regions as regions_module
from flipback.attacks.regions import explanation_order, lexicographic_ranks  # bound before the recording wrapper
from flipback.data.planted import Cue, default_size
from flipback.explain.metrics import topk_precision  # Quantus's relevance rank accuracy, with no ties
from flipback.runs import faithfulness
from flipback.targets.loading import load_model
from flipback.targets.whitebox import WhiteBoxTarget

BENCHMARK_ERRORS, DRAWN = 60, 160


def blur(a: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N,H,W) blurred by a Gaussian of `sigma` px, zero outside the image."""
    r = int(np.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    x = F.conv2d(F.pad(a[:, None].float(), (r, r, 0, 0)), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r)), g.view(1, 1, -1, 1))[:, 0]


def variants(changed, gain, effect, potential) -> dict[str, torch.Tensor]:
    n = len(changed)
    flat = lambda t: t.reshape(n, -1).float()  # noqa: E731
    first = flat(changed)
    second = torch.where(first > 0, flat(gain), flat(effect).sign())  # changed by gain; then helping regions
    out = {"own first-order gain (current)": explanation_order(changed, gain, effect, potential)}
    potential_rank = flat(potential).argsort(dim=1).argsort(dim=1).float() / first.shape[1]
    for sigma in (1.0, 2.0):
        close = flat(blur(changed.float() * gain.abs(), sigma))
        close = close / close.amax(1, keepdim=True).clamp_min(1e-12)
        out[f"closeness, sigma {sigma:g} px"] = lexicographic_ranks([first, second, close, flat(potential)])
        for lam in (0.5, 2.0):
            out[f"gain rank + {lam:g} x closeness, sigma {sigma:g}"] = lexicographic_ranks(
                [first, second, potential_rank + lam * close])
    return {k: v.view_as(gain) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", choices=("fmnist", "cifar"))
    ap.add_argument("kinds", nargs="+")
    ap.add_argument("--road", action="store_true", help="also ROAD AUC (Quantus; slower)")
    args = ap.parse_args()
    data = None if args.data == "fmnist" else "../shared/data/cifar10-jpeg"
    model = None if data is None else "cifar_resnet20:../shared/models/cifar10_resnet20.th"

    recorded = []
    original = regions_module.explanation_order

    def record(changed, gain, region_effect, potential):
        recorded.append((changed.cpu(), gain.cpu(), region_effect.cpu(), potential.cpu()))
        return original(changed, gain, region_effect, potential)

    regions_module.explanation_order = record
    rows: dict[str, dict[str, float]] = {}
    for kind in args.kinds:
        recorded.clear()
        cue = Cue(target=faithfulness.CUE.target, size=default_size(kind), kind=kind)
        info, spec, x, y, masks, k, _ = faithfulness._planted_images(data, model, DRAWN, False, lambda m: None, cue)
        perm = np.random.default_rng(0).permutation(info["n_planted_errors"])  # as _planted_images draws
        val = torch.from_numpy(~np.isin(np.sort(perm[:DRAWN]), perm[:BENCHMARK_ERRORS]))
        x, y = x[val], y[val]
        masks = masks[val] if masks is not None else None
        net = load_model(spec, k).module.eval()
        target = WhiteBoxTarget(net, k, torch.device("cpu"))
        result = regions_module.RegionsAttack().run(target, target, x, y)
        # The first call covers every image; a fallback pass for a few may follow, whose order
        # replaced the first pass's for the images it won: the variants here rank the first pass.
        inputs = recorded[0]
        assert len(inputs[0]) == len(x), [len(r[0]) for r in recorded]
        for name, maps in variants(*inputs).items():
            row = rows.setdefault(name, {})
            if masks is not None and masks.dtype == torch.bool:
                row[kind] = float(topk_precision(maps, masks).nanmean())
            if args.road:
                from flipback.explain.quantus_metrics import ROAD_PERCENTAGES, road, road_auc

                row[f"{kind} ROAD"] = road_auc(road(net, x, y.numpy(), maps, ROAD_PERCENTAGES))
        print(f"{kind}: {len(x)} validation errors, regions corrected {float(result.success.float().mean()):.0%}, "
              f"fallback passes {[len(r[0]) for r in recorded[1:]]}", file=sys.stderr, flush=True)
    regions_module.explanation_order = original
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    print("| order after the changed pixels | " + " | ".join(cols) + " | mean |")
    print("|---" * (len(cols) + 2) + "|")
    for name, row in rows.items():
        vals = [row.get(c, float("nan")) for c in cols]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.nanmean(vals):.3f} |")


if __name__ == "__main__":
    main()
