"""What every attack shares: argument checks and running the model in eval mode."""

from __future__ import annotations

import math

import torch

from ..features import eval_mode

__all__ = ["check_batch", "check_budget", "eval_mode", "per_example_norm"]


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x`` a batch of [0, 1] images ``[N, C, H, W]`` and ``y`` their ``N`` integer labels."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attacks follow gradients, which torch.inference_mode() turns off: call them outside it")
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images [N, C, H, W], got shape {tuple(x.shape)}")
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has shape {tuple(y.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must hold floating-point pixels in [0, 1], got {x.dtype}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")
    if x.numel():
        # An attack projects onto [0, 1]: an input outside it would be moved silently, off its ε-ball.
        low, high = torch.aminmax(x.detach())
        if not (low >= 0 and high <= 1):  # NaN fails both
            raise ValueError(f"x must hold pixels in [0, 1], got values in [{float(low):g}, {float(high):g}]")


def check_budget(**values: float) -> None:
    """Each named attack parameter is a finite number: ``eps`` (a radius) and ``steps`` (a whole number)
    at least 0, anything else (step sizes, margins) above 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if name == "steps" and value != int(value):
            raise ValueError(f"steps must be a whole number, got {value!r}")
        if name in ("eps", "steps") and value < 0:
            raise ValueError(f"need {name} >= 0, got {value!r}")
        if name not in ("eps", "steps") and value <= 0:
            raise ValueError(f"need {name} > 0, got {value!r}")


def per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against ``t``."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.ndim - 1)))
