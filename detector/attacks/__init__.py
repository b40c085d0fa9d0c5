"""Adversarial attacks, one module per family, each ``attack(model, x, y, **params) -> x_adv``.

- :mod:`.pgd`: PGD (L∞/L2, random start, early stop, recorded path) and FGSM, our own code;
- :mod:`.library`: CW-L2, DeepFool, APGD-CE and Square from torchattacks;
- :mod:`.adaptive`: white-box attacks that know the detector.

Every attack checks its arguments at the top and runs the model in eval mode, restoring its mode.
"""

from functools import partial

from .adaptive import (
    backoff_pgd,
    feature_matching_pgd,
    margin_capped_pgd,
    score_descent_pgd,
)
from .library import apgd_ce, cw_l2, deepfool, square
from .pgd import PGDResult, fgsm, pgd
from .registry import ATTACKS, AttackInfo, get_attack, list_attacks, register_attack

__all__ = [
    "ATTACKS", "AttackInfo", "PGDResult", "apgd_ce", "backoff_pgd", "cw_l2", "deepfool",
    "feature_matching_pgd", "fgsm", "get_attack", "list_attacks", "margin_capped_pgd", "pgd",
    "register_attack", "score_descent_pgd", "square",
]

register_attack("fgsm", kind="budget", norm="linf")(fgsm)
register_attack("pgd", kind="budget", norm="linf")(pgd)
register_attack("pgd-l2", kind="budget", norm="l2")(partial(pgd, norm="l2"))
register_attack("pgd-early-stop", kind="minimal", norm="linf")(partial(pgd, early_stop=True))
register_attack("apgd-ce", kind="budget", norm="linf")(apgd_ce)
register_attack("cw-l2", kind="minimal", norm="l2")(cw_l2)
register_attack("deepfool", kind="minimal", norm="l2")(deepfool)
register_attack("square", kind="black-box", norm="linf")(square)
register_attack("margin-capped", kind="adaptive", norm="linf", needs=("margin",))(margin_capped_pgd)
register_attack("backoff", kind="adaptive", norm="linf", needs=("flagged", "layer"))(backoff_pgd)
register_attack("feature-matching", kind="adaptive", norm="linf",
                needs=("features", "target", "scale", "score"))(feature_matching_pgd)
register_attack("score-descent", kind="adaptive", norm="linf",
                needs=("features", "decision", "margin", "score"))(score_descent_pgd)
