"""`flipback surrogate`: query a black-box target on the user's images and train a surrogate."""

from __future__ import annotations

import time
from pathlib import Path

from ..data import split_of
from ..errors import DataError
from ..targets.device import resolve_device
from ..targets.loading import dataset_for_model
from ..targets.surrogate import parse_members, save_surrogate, train_surrogate
from .progress import progress_bar


def run_surrogate(*, target: str, data: str, budget: int, out: Path, split: str = "train", output: str = "scores",
                  epochs: int = 30, members=None, seed: int = 0, flip: bool = True, mean=None, std=None,
                  allow_test_data: bool = False, device: str = "auto", show_progress: bool = True, log=print,
                  init: str | list[str] | None = None, classes: str | None = None,
                  batch_size: int = 128, max_memory: str | int | None = None, self_train: int = 0,
                  active: float = 0.0) -> dict:
    """Train a surrogate of `target` on `data` and save it to `out`; returns its metadata.

    The data is decoded as explain decodes it (dataset_for_model): with the target's eval
    transform when flipback can read one from its SPEC (hf:, timm:, .pt2, zoo), its classes
    matched to the target's (or to `classes`, a file). `batch_size`: images per training
    step, lowered where `max_memory` (a cap such as "8G"; None: 80% of what is free) holds
    fewer (the file records what each member trained with). `members` None: the default members, or
    with `init` (a pretrained model's SPEC, or a list of several, at no query cost) that model alone; see
    targets/surrogate.py. `self_train` N: then refit on the answers plus N unqueried images
    labelled by the first surrogate (no queries; see train_surrogate). `active` a: the last
    share a of the budget goes to the images a first surrogate is least sure about.

    Test (or validation) data is refused unless `allow_test_data`: a surrogate trained on the
    images it will later explain has seen the target's answers on them, which flatters the
    black-box results. The split is recorded in the file's metadata either way."""
    from ..targets.blackbox import load_blackbox

    members = parse_members(members, init)  # a bad name fails before any query
    dev = resolve_device(device)  # so does a device that is not there
    kind, why = split_of(data, split)  # before any decoding or query
    if kind == "test" and not allow_test_data:
        raise DataError(f"refusing to train a surrogate on test data: {data} ({why})",
                        hint="a surrogate that saw the target's answers on the images it will explain flatters the "
                             "black-box results; use training images (e.g. --split train), or pass "
                             "--allow-test-data to use these anyway")
    if kind == "test":
        log(f"warning: training the surrogate on test data ({why}), as --allow-test-data asks")
    ds = dataset_for_model(target, data, split=split, classes=classes, progress=show_progress)
    h, w, c = ds.shape
    t0 = time.perf_counter()
    with load_blackbox(target, ds.num_classes, output=output, budget=budget, mean=mean, std=std,
                       input_shape=(c, h, w)) as bb:
        n = min(budget, len(ds))
        with progress_bar("querying the target", total=n, enabled=show_progress) as q_adv, \
                progress_bar("training the surrogate", total=epochs * len(members) * (2 if self_train else 1),
                             enabled=show_progress,
                             unit="epoch") as t_adv:
            surrogate = train_surrogate(bb, ds, budget, members=members, epochs=epochs, seed=seed, flip=flip,
                                        batch_size=batch_size, max_memory=max_memory, self_train=self_train,
                                        active=active, target_spec=target, device=dev, init=init,
                                        progress=lambda stage, k: (q_adv if stage == "query" else t_adv)(k))
        surrogate.meta["queries"] = int(bb.queries)  # the accounting layer's exact count
    lowered = [b for b in surrogate.meta["member_batch_size"] if b < batch_size]
    if lowered:
        log(f"trained in batches of {min(lowered)} (not {batch_size}): the memory cap holds no more")
    surrogate.meta["split"] = kind  # "train", "test" (allowed) or "unknown"
    surrogate.meta["split_reason"] = why
    surrogate.meta["seconds"] = time.perf_counter() - t0
    save_surrogate(surrogate, out)
    log(f"surrogate saved to {out}")
    return surrogate.meta
