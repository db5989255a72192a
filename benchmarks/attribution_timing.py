"""Seconds per image of each Captum baseline on CIFAR ResNet-20, with its default settings.

    python benchmarks/attribution_timing.py [--weights ../shared/models/cifar10_resnet20.th]
        [--data ../shared/data/cifar10-jpeg/test] [--n 64] [--variant diff]

Uses the checkpoint and the first N misclassified test images when they exist; otherwise
random weights and random images (the cost of a method hardly depends on either). Each
method runs once on all N images with batch_size 64, as `attribute` is called in use.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flipback.explain.attribution import BASELINES, attribute
from flipback.targets import WhiteBoxTarget, load_model
from flipback.targets.zoo import ZOO, Normalized

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def _images(model, data: Path | None, n: int):
    """First n misclassified images of the data set, or n random images with made-up labels."""
    if data is not None and data.exists():
        from flipback.data import load_dataset
        from flipback.runs.errors import to_tensor

        ds = load_dataset(data)
        xs, ys = [], []
        for idx, images in ds.batches(500):
            x = to_tensor(images)
            with torch.no_grad():
                wrong = model(x).argmax(1) != torch.from_numpy(ds.labels[idx])
            xs.append(x[wrong])
            ys.append(torch.from_numpy(ds.labels[idx])[wrong])
            if sum(len(v) for v in xs) >= n:
                break
        return torch.cat(xs)[:n], torch.cat(ys)[:n].long(), f"first {n} misclassified images of {data}"
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        true = (model(x).argmax(1) + 1) % 10
    return x, true, f"{n} random images"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=SHARED / "models" / "cifar10_resnet20.th")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10-jpeg" / "test")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--variant", default="diff", choices=("pred", "diff"))
    args = ap.parse_args()

    if args.weights.exists():
        model = load_model(f"cifar_resnet20:{args.weights}", 10).module
        source = str(args.weights)
    else:
        torch.manual_seed(0)
        e = ZOO["cifar_resnet20"]
        model, source = Normalized(e.build(10), e.mean, e.std), "random weights"
    WhiteBoxTarget(model, 10)  # eval mode, frozen parameters
    x, true, what = _images(model, args.data if args.data.exists() else None, args.n)
    with torch.no_grad():
        pred = model(x).argmax(1)

    print(f"cifar_resnet20 ({source}), {what}, variant {args.variant}, {torch.get_num_threads()} threads\n")
    print("| method | s/image |")
    print("|---|---|")
    for method in BASELINES:
        t0 = time.perf_counter()
        attribute(method, model, x, true, pred, args.variant, batch_size=64)
        print(f"| {method} | {(time.perf_counter() - t0) / len(x):.4f} |", flush=True)


if __name__ == "__main__":
    main()
