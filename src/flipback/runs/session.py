"""What a run needs from its target, the same for white-box and black-box modes: uncounted
answers on unmodified images, a corrective attack, and extra summary figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..attacks import AttackResult, make_attack
from ..attacks.transfer import BLACK_BOX_ATTACKS
from ..data import Dataset
from ..errors import FlipbackError, ModelError
from ..targets import WhiteBoxTarget, load_model


@dataclass
class Session:
    num_classes: int
    scores: Callable[[torch.Tensor], torch.Tensor]  # uncounted (N, K) scores of unmodified images
    attack: Callable[[torch.Tensor, torch.Tensor, np.ndarray], AttackResult]
    close: Callable[[], None] = lambda: None
    summary: dict = field(default_factory=dict)  # extra summary keys of this mode
    spent: Callable[[], int] = lambda: 0  # counted queries so far, in all
    # Black-box: the accountant's exact per-image counts (retries included), and a way to
    # charge queries spent by an earlier, interrupted session to an image's budget.
    queries_for: Callable[[np.ndarray], np.ndarray] | None = None
    add_spent: Callable[[np.ndarray, np.ndarray], None] | None = None
    stats: Callable[[], dict] = dict  # the target's own counters for this session


def check_input_shape(expected, arch: str, ds: Dataset) -> None:
    h, w, c = ds.shape
    if expected is not None and tuple(expected) != (c, h, w):
        raise ModelError(
            f"{arch} expects {expected[0]}x{expected[1]}x{expected[2]} (CxHxW) images, the data set has {c}x{h}x{w}",
            hint="choose a model made for this data set",
        )


def white_box_session(cfg, ds: Dataset, attack_options: dict) -> Session:
    loaded = load_model(cfg.model, ds.num_classes, mean=cfg.mean, std=cfg.std, trust_model=cfg.trust_model)
    check_input_shape(loaded.input_shape, loaded.arch, ds)
    target = WhiteBoxTarget(loaded.module, ds.num_classes)
    attack = make_attack(cfg.method, **attack_options)
    return Session(ds.num_classes, lambda x: target.predict(x, counted=False),
                   lambda x, y, idx: attack.run(target, x, y), spent=lambda: target.queries)


def black_box_session(cfg, ds: Dataset, attack_options: dict) -> Session:
    from ..targets.blackbox import load_blackbox
    from ..targets.surrogate import load_surrogate

    if not cfg.surrogate:
        raise FlipbackError("black-box mode needs a surrogate", hint="train one with `flipback surrogate`, "
                            "then pass --surrogate FILE")
    surrogate = load_surrogate(cfg.surrogate)
    h, w, c = ds.shape
    check_input_shape(surrogate.meta["input_shape"], "the surrogate", ds)
    if surrogate.meta["num_classes"] != ds.num_classes:
        raise ModelError(f"the surrogate has {surrogate.meta['num_classes']} classes, the data set {ds.num_classes}")
    target = load_blackbox(cfg.model, ds.num_classes, output=cfg.output, per_image_budget=cfg.budget,
                           mean=cfg.mean, std=cfg.std, input_shape=(c, h, w), trust_model=cfg.trust_model,
                           timeout=cfg.timeout, retries=cfg.retries)
    if cfg.method not in BLACK_BOX_ATTACKS:
        target.close()
        raise FlipbackError(f"method '{cfg.method}' has no black-box version",
                            hint=f"choose one of: {', '.join(BLACK_BOX_ATTACKS)}")
    attack = BLACK_BOX_ATTACKS[cfg.method](surrogate.module, ds.num_classes, **attack_options)

    def scores(x: torch.Tensor) -> torch.Tensor:
        answer = target.query(x, counted=False)
        if answer.scores is not None:
            return answer.scores.float()
        return torch.nn.functional.one_hot(answer.labels, ds.num_classes).float()  # hard-label target

    meta = surrogate.meta
    return Session(ds.num_classes, scores, lambda x, y, idx: attack.run(target, x, y, torch.from_numpy(idx)),
                   target.close, {"output": cfg.output, "surrogate": cfg.surrogate,
                                  "surrogate_queries": meta["queries"], "surrogate_agreement": meta["agreement"],
                                  "surrogate_output": meta["output"]},
                   spent=lambda: target.queries,
                   queries_for=lambda idx: target.queries_for(torch.from_numpy(idx)).numpy(),
                   add_spent=lambda idx, n: target.add_spent(torch.from_numpy(idx), torch.from_numpy(n)),
                   stats=target.stats)
