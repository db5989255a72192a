"""The published methods 1 and 2 (Haffar et al., MDAI 2021): iterative signed-gradient steps
toward the true label, querying after each step and stopping at the first correct answer.
White-box, the target's own gradients steer (method 1); black-box, a surrogate's (method 2).
Either way each candidate costs one query.

The paper does not give its step size. The default, one 8-bit level (1/255) per step,
keeps every candidate on the 8-bit grid without rounding and was the best of the step
sizes we swept on CIFAR-10 (docs/benchmarks.md). The objective is the cross-entropy of
the true label, as in FGSM-style attacks.
"""

from __future__ import annotations

import torch

from ..targets.guide import neg_cross_entropy
from .base import AttackResult, CorrectiveAttack, to_grid


class PaperAttack(CorrectiveAttack):
    name = "paper"
    state_copies = 12

    def __init__(self, *, step: float = 1 / 255, max_steps: int = 20, pixels: str = "uint8"):
        super().__init__(pixels=pixels)
        self.step = step
        self.max_queries = self.max_steps = max_steps

    def run(self, oracle, guide, images, labels, ids=None, *, budget=None) -> AttackResult:
        call = self.start(oracle, guide, images, labels, ids, budget)
        # The gradient on the unmodified image comes with finding the error: not counted.
        _, grad = call.original_gradient(neg_cross_entropy)
        active = torch.arange(len(call), device=call.device)
        for _ in range(self.max_steps):
            has_budget = call.left(active) > 0
            active, grad = active[has_budget], grad[has_budget]
            if len(active) == 0:
                break
            x = to_grid(call.corrected[active] + self.step * grad.sign(), self.pixels)
            verdict, _, grad = call.probe(active, x, neg_cross_entropy)
            call.record(active, x, verdict)
            active, grad = active[~verdict.ok], grad[~verdict.ok]
        return call.result()
