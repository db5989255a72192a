"""Corrective attacks: each a small class with one verb, `run(oracle, guide, images, labels)`.

One registry lists every method with the modes it runs in. White-box, the target is both
oracle and guide; black-box, the oracle is the target and the guide a surrogate.
"""

from .base import MIN_MARGIN, MODES, PIXELS, AttackCall, AttackResult, Corrected, CorrectiveAttack, Verdict, to_grid
from .fast import FastAttack
from .minimal import MinimalAttack
from .paper import PaperAttack
from .regions import RegionsAttack

ATTACKS: dict[str, type[CorrectiveAttack]] = {a.name: a for a in (PaperAttack, FastAttack, MinimalAttack, RegionsAttack)}


def make_attack(name: str, **options) -> CorrectiveAttack:
    if name not in ATTACKS:
        from ..errors import FlipbackError

        raise FlipbackError(f"unknown method '{name}'", hint=f"choose one of: {', '.join(ATTACKS)}")
    return ATTACKS[name](**options)


def methods_table() -> dict[str, tuple[str, ...]]:
    """Every method and the modes it supports."""
    return {name: cls.modes for name, cls in ATTACKS.items()}


__all__ = ["ATTACKS", "AttackCall", "AttackResult", "Corrected", "CorrectiveAttack", "FastAttack", "MIN_MARGIN",
           "MODES", "MinimalAttack", "PIXELS", "PaperAttack", "RegionsAttack", "Verdict", "make_attack",
           "methods_table", "to_grid"]
