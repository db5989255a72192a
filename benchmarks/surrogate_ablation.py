"""What the surrogate's ensemble buys the black-box `fast` method.

    python benchmarks/surrogate_ablation.py SURROGATE.th [N]    (default: all errors; needs ../shared)

SURROGATE.th is a file written by `flipback surrogate`, usually with several members (the
default: resnet20, cnn32, cnn32). Every non-empty subset of its members is used as the surrogate, with
no retraining, against the public ResNet-20 as a black box (in process, with the answers the
file was trained on: scores or labels), on its first N CIFAR-10 JPEG test errors. Each row
reports the subset's agreement with the target on the 10,000 test images and the `fast`
method's success, mean target queries, share corrected by the first query and median L2.
"""

import itertools
import sys
import time

import torch

from flipback.attacks import FastAttack
from flipback.targets import ModelGuide
from flipback.data import load_dataset
from flipback.runs.errors import to_tensor
from flipback.runs.faithfulness import _real_images
from flipback.targets.blackbox import load_blackbox
from flipback.targets.surrogate import SurrogateEnsemble, agreement, load_surrogate

SPEC = "cifar_resnet20:../shared/models/cifar10_resnet20.th"
DATA = "../shared/data/cifar10-jpeg"


def fast_black_box(target, model, k: int, x, y, max_queries: int = 10):
    """(success, queries, L2) of black-box `fast` guided by `model` on images `x` with true
    labels `y`, 256 at a time; the attack's query counts are checked against the target's."""
    before = target.queries
    guide = ModelGuide(model, k)
    results = [FastAttack(max_queries=max_queries).run(target, guide, x[s:s + 256], y[s:s + 256],
                                                       torch.arange(s, min(s + 256, len(x))))
               for s in range(0, len(x), 256)]
    success = torch.cat([r.success for r in results])
    queries = torch.cat([r.queries for r in results])
    assert int(queries.sum()) == target.queries - before  # the accountant agrees
    return success, queries, (torch.cat([r.corrected for r in results]) - x).flatten(1).norm(dim=1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    surrogate = load_surrogate(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10**9
    ensemble = isinstance(surrogate.module, SurrogateEnsemble)
    members, names = (surrogate.module.members if ensemble else [surrogate.module]), surrogate.meta["members"]
    _, _, x, y, _, k, _ = _real_images(DATA, SPEC, n, False)
    test = load_dataset(DATA, split="test", progress=False)
    everything = to_tensor(test.images[:])
    output = surrogate.meta["output"]
    with load_blackbox(SPEC, k, output=output) as target:
        target_labels = target.query(everything, counted=False).labels
        print(f"| surrogate members ({len(x)} errors, target answers: {output}) | agreement (test set) | success "
              f"| mean queries | corrected by the first query | median L2 | s |")
        print("|---|---|---|---|---|---|---|")
        for size in range(1, len(members) + 1):
            for subset in itertools.combinations(range(len(members)), size):
                model = SurrogateEnsemble([members[i] for i in subset]).eval()
                agreed = agreement(model, everything, target_labels)
                t0 = time.perf_counter()
                success, queries, l2 = fast_black_box(target, model, k, x, y)
                label = " + ".join(f"{names[i]} (#{i + 1})" for i in subset)
                print(f"| {label} | {agreed:.1%} | {success.float().mean():.2%} | {queries.float().mean():.3f} | "
                      f"{(success & (queries == 1)).float().mean():.1%} | {l2[success].median():.3f} | "
                      f"{time.perf_counter() - t0:.0f} |", flush=True)
