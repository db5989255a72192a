"""What each part of the `regions` method buys, measured by deletion-to-correct.

    python benchmarks/regions_ablation.py [N]    (default 200; needs ../shared)

On the first N of ResNet-20's CIFAR-10 JPEG test errors, each configuration of the method
runs white-box, and its explanation order is scored by deletion-to-correct (blur sigma 4).
"""

import sys
import time

import torch

from flipback.attacks import RegionsAttack
from flipback.explain.metrics import deletion_to_correct
from flipback.runs.faithfulness import _real_images
from flipback.targets.loading import load_model
from flipback.targets.whitebox import WhiteBoxTarget

CONFIGS = {
    "gradient-grown regions, free change (eps 0.5), 64 regions": dict(change="free", scoring="gradient",
                                                                     n_segments=64, pixel_steps=0),
    "+ removal toward the blur instead of a free change": dict(scoring="gradient", n_segments=64, pixel_steps=0),
    "+ regions ordered by their measured removal effect": dict(n_segments=64, pixel_steps=0),
    "+ about 100 regions (one per 10 pixels)": dict(pixel_steps=0),
    "+ fewest pixels (the default)": dict(),
}

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    torch.set_num_threads(2)
    spec = "cifar_resnet20:../shared/models/cifar10_resnet20.th"
    _, _, x, y, _, k = _real_images("../shared/data/cifar10-jpeg", spec, n, False)
    net = load_model(spec, k).module.eval()
    target = WhiteBoxTarget(net, k)
    print(f"| configuration ({n} errors) | success | mean queries | median regions | 1% | 2% | 5% | 10% | AUC | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, opts in CONFIGS.items():
        t0 = time.perf_counter()
        r = RegionsAttack(**opts).run(target, target, x, y)
        seconds = (time.perf_counter() - t0) / n
        d = deletion_to_correct(lambda t: net(t).detach(), x, y, r.order)
        rates = " | ".join(f"{float(v):.1%}" for v in d.rates)
        print(f"| {name} | {r.success.float().mean():.1%} | {r.queries.float().mean():.1f} | "
              f"{r.regions[r.success].amax((1, 2)).float().median():.0f} | {rates} | {d.auc:.3f} | {seconds:.3f} |",
              flush=True)
