"""A run's engine: (oracle, guide, attack) rebuilt from the run's plain config.

The config is a dataclass of strings and numbers, so it pickles: any process (a worker, a
Ray actor) can call `build_engine(cfg, ...)` and get the same engine. Nothing here holds a
closure. White-box, the target is both oracle and guide; black-box, the oracle is the target
behind the query-accounting layer and the guide is the surrogate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..attacks import CorrectiveAttack, make_attack
from ..errors import FlipbackError, ModelError
from ..targets import ModelGuide, WhiteBoxTarget, load_model
from ..targets.device import resolve_device

def attack_options(cfg) -> dict:
    opts = {"pixels": cfg.pixels, **cfg.options}
    if cfg.budget is not None:
        opts["max_steps" if cfg.method == "paper" else "max_queries"] = cfg.budget
    return opts


def check_input_shape(expected, arch: str, shape_hwc) -> None:
    h, w, c = shape_hwc
    if expected is not None and tuple(expected) != (c, h, w):
        raise ModelError(
            f"{arch} expects {expected[0]}x{expected[1]}x{expected[2]} (CxHxW) images, the data set has {c}x{h}x{w}",
            hint="choose a model made for this data set",
        )


@dataclass
class Engine:
    oracle: object  # targets.oracle.Oracle
    guide: object  # targets.guide.ModelGuide (the oracle itself in white-box mode)
    attack: CorrectiveAttack
    summary: dict = field(default_factory=dict)  # extra summary keys of this mode

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Free (N, K) scores of unmodified images; one-hot for a hard-label target."""
        answer = self.oracle.answer(x)
        if answer.scores is not None:
            return answer.scores.float().cpu()
        return torch.nn.functional.one_hot(answer.labels.cpu(), self.oracle.num_classes).float()

    def run(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, budget: torch.Tensor | None = None):
        return self.attack.run(self.oracle, self.guide, x, y, torch.from_numpy(np.asarray(idx, dtype=np.int64)),
                               budget=budget)

    def spent(self, idx: np.ndarray) -> np.ndarray:
        return self.oracle.spent(torch.from_numpy(np.asarray(idx, dtype=np.int64))).numpy()

    def add_spent(self, idx: np.ndarray, counts: np.ndarray) -> None:
        self.oracle.add_spent(torch.from_numpy(idx), torch.from_numpy(counts))

    def close(self) -> None:
        self.oracle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_engine(cfg, num_classes: int, shape_hwc: tuple[int, int, int]) -> Engine:
    """(oracle, guide, attack) for a run config (runs.explain_run.ExplainConfig)."""
    if cfg.mode not in ("white-box", "black-box"):
        raise FlipbackError(f"unknown mode '{cfg.mode}'", hint="use --mode white-box or --mode black-box")
    attack = make_attack(cfg.method, **attack_options(cfg))
    if cfg.mode not in attack.modes:
        raise FlipbackError(f"method '{cfg.method}' does not run in {cfg.mode} mode")
    budget = attack.budget_for(guide_free=cfg.mode == "black-box", shape=tuple(shape_hwc[:2]))  # held by the oracle's ledger, across sessions
    device = resolve_device(cfg.device)
    if cfg.mode == "white-box":
        loaded = load_model(cfg.model, num_classes, mean=cfg.mean, std=cfg.std, trust_model=cfg.trust_model)
        check_input_shape(loaded.input_shape, loaded.arch, shape_hwc)
        target = WhiteBoxTarget(loaded.module, num_classes, device, per_image_budget=budget)
        return Engine(target, target, attack)

    from ..targets.blackbox import load_blackbox
    from ..targets.surrogate import load_surrogate

    if not cfg.surrogate:
        raise FlipbackError("black-box mode needs a surrogate", hint="train one with `flipback surrogate`, "
                            "then pass --surrogate FILE")
    surrogate = load_surrogate(cfg.surrogate, trust_model=cfg.trust_model)  # a python: --init runs code
    check_input_shape(surrogate.meta["input_shape"], "the surrogate", shape_hwc)
    if surrogate.meta["num_classes"] != num_classes:
        raise ModelError(f"the surrogate has {surrogate.meta['num_classes']} classes, the data set {num_classes}")
    h, w, c = shape_hwc
    target = load_blackbox(cfg.model, num_classes, output=cfg.output, per_image_budget=budget,
                           mean=cfg.mean, std=cfg.std, input_shape=(c, h, w), trust_model=cfg.trust_model,
                           timeout=cfg.timeout, retries=cfg.retries)
    meta = surrogate.meta
    summary = {"output": cfg.output, "surrogate": cfg.surrogate, "surrogate_queries": meta["queries"],
               "surrogate_agreement": meta["agreement"], "surrogate_output": meta["output"]}
    if "split" in meta:
        summary["surrogate_split"] = meta["split"]
    return Engine(target, ModelGuide(surrogate.module, num_classes, device), attack, summary)
