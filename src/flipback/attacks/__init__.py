"""Corrective attacks: each a small class with one verb, `run(target, images, labels)`."""

from .base import MIN_MARGIN, PIXELS, AttackResult, CorrectiveAttack, to_grid
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


__all__ = ["ATTACKS", "AttackResult", "CorrectiveAttack", "FastAttack", "MIN_MARGIN", "MinimalAttack",
           "PIXELS", "PaperAttack", "RegionsAttack", "make_attack", "to_grid"]
