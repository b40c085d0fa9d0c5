"""One registry of attacks by name, filled by a decorator that refuses duplicate names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ATTACKS", "AttackInfo", "get_attack", "list_attacks", "register_attack"]


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack: ``fn(model, x, y, **params) -> x_adv`` and what kind of attack it is.

    ``kind`` is ``"budget"`` (spends its whole perturbation budget: overshoots), ``"minimal"`` (stops
    near the decision boundary), ``"adaptive"`` (knows the detector) or ``"black-box"``.
    """

    name: str
    fn: Callable
    kind: str
    norm: str
    needs: tuple[str, ...] = ()  # extra keyword arguments the evaluation must supply (oracles, features)


ATTACKS: dict[str, AttackInfo] = {}
KINDS = ("budget", "minimal", "adaptive", "black-box")


def register_attack(name: str, *, kind: str, norm: str, needs: tuple[str, ...] = ()):
    """Register ``fn`` under ``name``; a second registration of the same name is an error."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def decorate(fn: Callable) -> Callable:
        if name in ATTACKS:
            raise ValueError(f"an attack named {name!r} is already registered")
        ATTACKS[name] = AttackInfo(name, fn, kind, norm, tuple(needs))
        return fn

    return decorate


def list_attacks(kind: str | None = None) -> list[str]:
    """Registered attack names (of one ``kind`` when given), sorted."""
    return sorted(n for n, a in ATTACKS.items() if kind is None or a.kind == kind)


def get_attack(name: str) -> AttackInfo:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; registered: {list_attacks()}") from None
