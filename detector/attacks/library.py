"""Attacks from torchattacks (Kim, 2020), wrapped to the shape of :func:`~detector.attacks.pgd.pgd`:
``attack(model, x, y, **params) -> x_adv``, pixels in [0, 1], the model's mode restored.

torchattacks is tensor-native (batches stay on their device) and ports the reference
implementations of APGD and Square from their authors' code; writing these here would only add
copies to maintain.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import check_batch, check_budget, eval_mode

__all__ = ["apgd_ce", "cw_l2", "deepfool", "square"]


def _run(attack_class, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor:
    import torchattacks  # imported on first use: ~0.5 s, and only evaluation needs it

    check_batch(x, y)
    # APGD and Square reseed torch's global generators with their own seed: fork them, so that the
    # caller's random stream goes on as if no attack had run.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        attack = getattr(torchattacks, attack_class)(model, **params)
        return attack(x.detach(), y.to(x.device, torch.long)).detach()


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, c: float = 1.0, steps: int = 50,
          lr: float = 0.01, kappa: float = 0.0) -> torch.Tensor:
    """Carlini & Wagner (2017) L2: minimises ‖δ‖₂² + c·max(z_y − max_{j≠y} z_j, −κ) with Adam."""
    check_budget(c=c, steps=steps, lr=lr)
    if not kappa >= 0:
        raise ValueError(f"need kappa >= 0, got {kappa!r}")
    return _run("CW", model, x, y, c=c, kappa=kappa, steps=steps, lr=lr)


def deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 50,
             overshoot: float = 0.02) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al., 2016): steps to the nearest linearised decision boundary."""
    check_budget(steps=steps)
    if not overshoot >= 0:
        raise ValueError(f"need overshoot >= 0, got {overshoot!r}")
    return _run("DeepFool", model, x, y, steps=steps, overshoot=overshoot)


def apgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, steps: int = 10,
            norm: str = "linf", seed: int = 0) -> torch.Tensor:
    """Auto-PGD on the cross-entropy (Croce & Hein, 2020): step size adapted per input."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    check_budget(eps=eps, steps=steps)
    return _run("APGD", model, x, y, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=steps,
                n_restarts=1, seed=seed, loss="ce")


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255,
           n_queries: int = 1000, seed: int = 0) -> torch.Tensor:
    """Square attack (Andriushchenko et al., 2020), L∞, black-box: queries the model's outputs only."""
    check_budget(eps=eps, n_queries=n_queries)
    return _run("Square", model, x, y, norm="Linf", eps=eps, n_queries=n_queries, n_restarts=1, seed=seed)
