"""Projected gradient descent (Madry et al., 2018) that can record the path it takes, and FGSM.

The attack already runs a forward pass at every iterate x_0 … x_{T−1} to get its gradient; with
``record=True`` the same pass also yields ψ, κ, the loss and the prediction at that iterate, so
recording the path costs one extra forward pass (at x_T) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..features import _forward_at, find_last_linear, psi, sharpness_from_psi
from ._base import check_batch, check_budget, eval_mode, per_example_norm

__all__ = ["PGDResult", "fgsm", "pgd"]

_NORMS = ("linf", "l2")


@dataclass
class PGDResult:
    """The adversarial batch and, per example, the path x_0 (clean) … x_T (under a random start too:
    x_0 is the clean input, x_1 the first step from the random start).

    Path tensors have the step as their second axis: ``sharpness``, ``loss``, ``phi_sq`` (‖φ‖²)
    and ``predictions`` are ``[N, T+1]``, ``psi`` and ``logits`` are ``[N, T+1, k]``.  With
    ``keep_iterates=True`` ``iterates`` holds every x_t, ``[N, T+1, C, H, W]``.
    """

    x_adv: torch.Tensor
    sharpness: torch.Tensor
    loss: torch.Tensor
    predictions: torch.Tensor
    psi: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    phi_sq: torch.Tensor
    iterates: torch.Tensor | None = None

    @property
    def success(self) -> torch.Tensor:
        """Whether the final iterate is misclassified (prediction differs from the true label)."""
        return self.predictions[:, -1] != self.labels


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def _random_start(x: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x)
        return (2 * noise - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device="cpu").to(x)
    direction = direction / per_example_norm(direction).clamp_min(1e-12)
    radius = torch.rand((x.shape[0],), generator=generator, device="cpu").to(x)
    return direction * eps * radius.view(-1, *([1] * (x.ndim - 1)))


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    norm: str = "linf",
    random_start: bool = False,
    record: bool = False,
    *,
    early_stop: bool = False,
    keep_iterates: bool = False,
    layer: str | None = None,
    seed: int | None = None,
) -> torch.Tensor | PGDResult:
    """Untargeted PGD on the cross-entropy of the true labels ``y``, for pixels in [0, 1].

    Every step is projected onto the ε-ball around ``x`` (L∞ or L2) and onto [0, 1].  The model
    runs in eval mode (its previous mode is restored afterwards) and gradients are taken with
    respect to the input only, so nothing accumulates in its parameters.

    ``random_start`` starts each example at a random point of the ball, drawn from a generator seeded
    with ``seed`` (torch's global generator when ``seed`` is None); with no steps there is no start.

    ``early_stop=True`` freezes each example at the first iterate the model misclassifies: the
    minimal-effort variant, which stops near the decision boundary instead of overshooting.

    Returns the adversarial batch ``[N, C, H, W]``, or with ``record=True`` a :class:`PGDResult`
    holding the path (``keep_iterates=True`` keeps every x_t too).  ``layer`` names the output
    layer for ψ/κ when it is not the last ``nn.Linear``.
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    check_budget(eps=eps, alpha=alpha, steps=steps)
    if keep_iterates and not record:
        raise ValueError("keep_iterates=True needs record=True")
    check_batch(x, y)
    x0 = x.detach()
    y = y.to(x0.device, torch.long)
    linear = find_last_linear(model, layer) if record else None  # looked up once, not per step
    weight = linear.weight if record else None
    path: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "sharpness", "loss", "predictions", "psi", "logits", "phi_sq", "iterates")}

    def record_step(x_t: torch.Tensor, logits: torch.Tensor, phi: torch.Tensor, loss: torch.Tensor) -> None:
        values = psi(logits.detach(), phi.detach())
        path["psi"].append(values)
        path["sharpness"].append(sharpness_from_psi(values, weight))
        path["loss"].append(loss.detach().to(values.dtype))
        path["predictions"].append(logits.detach().argmax(dim=1))
        path["logits"].append(logits.detach().to(values.dtype))
        path["phi_sq"].append(phi.detach().to(values.dtype).pow(2).sum(dim=1))
        if keep_iterates:
            path["iterates"].append(x_t.detach().clone())

    with eval_mode(model):
        x_adv = x0.clone()
        started_away = random_start and eps > 0 and steps > 0  # no steps: the clean input, as without a start
        if started_away:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            x_adv = (x0 + _random_start(x0, eps, norm, generator)).clamp(0.0, 1.0)
            x_adv = x0 + _project(x_adv - x0, eps, norm)
            if record:  # the path starts at the clean input; the random start is not one of its points
                with torch.no_grad():
                    logits, phi = _forward_at(model, linear, x0)
                    record_step(x0, logits, phi, F.cross_entropy(logits.float(), y, reduction="none"))
        for t in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                if record:
                    logits, phi = _forward_at(model, linear, x_adv)
                else:
                    logits, phi = model(x_adv), None
                losses = F.cross_entropy(logits.float(), y, reduction="none")
                (grad,) = torch.autograd.grad(losses.sum(), x_adv)
            if record and not (started_away and t == 0):
                record_step(x_adv, logits, phi, losses)
            with torch.no_grad():
                if norm == "linf":
                    step = alpha * grad.sign()
                else:
                    step = alpha * grad / per_example_norm(grad).clamp_min(1e-12)
                if early_stop:  # misclassified examples stay where they are
                    step = step * (logits.detach().argmax(dim=1) == y).view(-1, *([1] * (x0.ndim - 1)))
                # Clip to [0, 1], then project onto the ball: the result is a convex combination
                # of x0 and a point in [0, 1], so it lies in both sets (for L∞ the order is moot).
                delta = _project((x_adv.detach() + step).clamp(0.0, 1.0) - x0, eps, norm)
                x_adv = (x0 + delta).clamp(0.0, 1.0)  # guards against rounding only
        x_adv = x_adv.detach()
        if not record:
            return x_adv
        with torch.no_grad():
            logits, phi = _forward_at(model, linear, x_adv)
            record_step(x_adv, logits, phi, F.cross_entropy(logits.float(), y, reduction="none"))
    return PGDResult(
        x_adv=x_adv,
        sharpness=torch.stack(path["sharpness"], dim=1),
        loss=torch.stack(path["loss"], dim=1),
        predictions=torch.stack(path["predictions"], dim=1),
        psi=torch.stack(path["psi"], dim=1),
        labels=y,
        logits=torch.stack(path["logits"], dim=1),
        phi_sq=torch.stack(path["phi_sq"], dim=1),
        iterates=torch.stack(path["iterates"], dim=1) if keep_iterates else None,
    )


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al., 2015): one L∞ step of size ε, clipped to [0, 1].

    Exactly PGD with one step of size ε and no random start.
    """
    return pgd(model, x, y, eps=eps, alpha=max(eps, 1e-12), steps=1)
