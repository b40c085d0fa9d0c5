"""White-box attacks that know the detector and try to slip past it.

Each keeps the ε-ball and [0, 1] of :func:`~detector.attacks.pgd.pgd` and differs in what it
optimises or which iterate it returns:

- :func:`margin_capped_pgd` stops pushing once the wrong class leads by a clean-like logit margin,
  so the adversarial stays as (un)sure as clean inputs instead of overshooting into the valley;
- :func:`backoff_pgd` walks back along the recorded PGD path to the first misclassified iterate the
  detector does not flag;
- :func:`feature_matching_pgd` adds λ·(distance of the detector's features to clean ones) to the
  loss and keeps, per input, its misclassified iterate with the lowest detector score;
- :func:`score_descent_pgd` descends the detector's own decision function (exact for a linear
  detector, trees softened to sigmoids otherwise: :mod:`detector.smoothing`), with the margin
  capped as above, and keeps the least suspicious misclassified iterate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._base import check_batch, check_budget, eval_mode
from .pgd import _project, pgd

__all__ = ["backoff_pgd", "feature_matching_pgd", "margin_capped_pgd", "score_descent_pgd"]

#: ``flagged(x) -> bool [N]`` / ``score(x) -> float [N]``: the detector as the attacker queries it.
Oracle = Callable[[torch.Tensor], torch.Tensor]


def _linf_step(x_adv: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    delta = _project((x_adv.detach() + alpha * grad.sign()).clamp(0.0, 1.0) - x0, eps, "linf")
    return (x0 + delta).clamp(0.0, 1.0)


def margin_capped_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                      steps: int, margin: float) -> torch.Tensor:
    """L∞ PGD on the logit margin ``max_{j≠y} z_j − z_y``, capped at ``margin``.

    Once the wrong class leads by ``margin`` logits the loss is flat and the input stays put: a
    misclassification with the confidence of a typical clean input (pass the clean median margin).
    """
    check_budget(eps=eps, alpha=alpha, steps=steps, margin=margin)
    check_batch(x, y)
    x0, y = x.detach(), y.to(x.device, torch.long)
    with eval_mode(model):
        x_adv = x0.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                z = model(x_adv).float()
                true = z.gather(1, y[:, None]).squeeze(1)
                other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
                (grad,) = torch.autograd.grad((other - true).clamp(max=margin).sum(), x_adv)
            with torch.no_grad():
                x_adv = _linf_step(x_adv, x0, grad, eps, alpha)
    return x_adv.detach()


def backoff_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
                flagged: Oracle, layer: str | None = None) -> torch.Tensor:
    """L∞ PGD whose answer is, per input, the first misclassified iterate ``flagged`` lets through
    (the final iterate when there is none)."""
    check_batch(x, y)
    path = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, record=True, keep_iterates=True, layer=layer)
    iterates = path.iterates  # [N, T+1, C, H, W]
    n, t1 = iterates.shape[:2]
    with torch.no_grad():
        passed = ~flagged(iterates.flatten(0, 1)).to(torch.bool).view(n, t1).to(x.device)
    usable = passed & (path.predictions != y.to(path.predictions.device)[:, None]).to(x.device)
    usable[:, 0] = False  # x_0 is the clean input itself
    first = torch.where(usable.any(dim=1), usable.int().argmax(dim=1), torch.full_like(y, t1 - 1).to(x.device))
    return iterates[torch.arange(n, device=x.device), first].detach()


def feature_matching_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                         steps: int, features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                         target: torch.Tensor, scale: torch.Tensor, lam: float, score: Oracle) -> torch.Tensor:
    """L∞ PGD on ``margin − lam · log(1 + mean(((features − target) / scale)²))``, where the margin is
    ``max_{j≠y} z_j − z_y`` (Carlini & Wagner's loss).

    The margin, unlike the cross-entropy, keeps its gradient at confidently classified clean inputs,
    and the log keeps the two terms comparable: far from the clean features the squared distance
    grows by orders of magnitude and would drown the margin at any fixed ``lam``.

    ``features(x) -> (logits, rows)`` is one differentiable forward pass giving the logits and the
    detector's feature rows; ``target`` and ``scale`` are the clean rows' mean and spread.  Per input
    the answer is the misclassified iterate with the lowest ``score`` seen (the final iterate when
    none was misclassified).
    """
    if eps < 0 or alpha <= 0 or steps < 1 or not lam >= 0:  # the budget's finiteness: _least_suspicious_pgd
        raise ValueError(f"need eps >= 0, alpha > 0, steps >= 1 and lam >= 0 (got {eps}, {alpha}, {steps}, {lam})")
    target, scale = target.to(x.device), scale.to(x.device).clamp_min(1e-6)

    def loss(logits: torch.Tensor, rows: torch.Tensor, wrong_margin: torch.Tensor) -> torch.Tensor:
        distance = torch.log1p(((rows.float() - target) / scale).pow(2).mean(dim=1))
        return wrong_margin - lam * distance

    return _least_suspicious_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, features=features, loss=loss,
                                 score=score)


def score_descent_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
                      features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                      decision: Callable[[torch.Tensor], torch.Tensor] | None, margin: float, lam: float,
                      score: Oracle) -> torch.Tensor:
    """L∞ PGD that misclassifies first (up the wrong-class margin) and then, per input while it stays
    misclassified, descends ``−min(margin_wrong, margin) + lam · decision(rows)``: a clean-like margin
    and the detector's own decision function pushed down.

    ``features(x) -> (logits, rows)`` is one differentiable forward pass; ``decision(rows)`` the
    detector's logit as a differentiable tensor (exact, or a smoothed stand-in for trees), or None,
    where the attack is the margin-capped PGD that keeps its least suspicious misclassified iterate.
    Per input the answer is the misclassified iterate with the lowest ``score`` seen.
    """
    if eps < 0 or alpha <= 0 or steps < 1 or not lam >= 0 or not margin > 0:
        raise ValueError(f"need eps >= 0, alpha > 0, steps >= 1, lam >= 0 and margin > 0 "
                         f"(got {eps}, {alpha}, {steps}, {lam}, {margin})")

    def loss(logits: torch.Tensor, rows: torch.Tensor, wrong_margin: torch.Tensor) -> torch.Tensor:
        capped = wrong_margin.clamp(max=margin)
        if decision is None:
            return capped
        # once misclassified, also down the detector's score
        return torch.where(wrong_margin > 0, capped - lam * decision(rows).float(), wrong_margin)

    return _least_suspicious_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, features=features, loss=loss,
                                 score=score)


def _least_suspicious_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                          steps: int, features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                          loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                          score: Oracle) -> torch.Tensor:
    """L∞ PGD up ``loss(logits, rows, wrong_margin)`` (per input; ``wrong_margin`` = max_{j≠y} z_j − z_y)
    that keeps, per input, the misclassified iterate with the lowest ``score`` (the final iterate
    when none was misclassified)."""
    check_budget(eps=eps, alpha=alpha, steps=steps)
    check_batch(x, y)
    x0, y = x.detach(), y.to(x.device, torch.long)
    best = x0.clone()
    best_score = torch.full((x0.shape[0],), float("inf"), device=x.device)
    with eval_mode(model):
        x_adv = x0.clone()
        for t in range(steps + 1):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits, rows = features(x_adv)
                z = logits.float()
                wrong_margin = z.scatter(1, y[:, None], float("-inf")).amax(dim=1) - z.gather(1, y[:, None]).squeeze(1)
                (grad,) = torch.autograd.grad(loss(logits, rows, wrong_margin).sum(), x_adv)
            with torch.no_grad():
                wrong = logits.argmax(dim=1) != y
                if t > 0 and wrong.any():
                    s = score(x_adv.detach()).to(x.device).float()
                    better = wrong & (s < best_score)
                    best[better] = x_adv.detach()[better]
                    best_score = torch.where(better, s, best_score)
                if t < steps:
                    x_adv = _linf_step(x_adv, x0, grad, eps, alpha)
        never = torch.isinf(best_score)
        best[never] = x_adv.detach()[never]
    return best.detach()
