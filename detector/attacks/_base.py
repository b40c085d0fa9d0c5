"""What every attack shares: argument checks and running the model in eval mode."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["check_batch", "eval_mode", "per_example_norm"]


@contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode (batch norm on running statistics, no dropout) and restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x`` a batch of [0, 1] images ``[N, C, H, W]`` and ``y`` their ``N`` integer labels."""
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images [N, C, H, W], got shape {tuple(x.shape)}")
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has shape {tuple(y.shape)}")


def per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against ``t``."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.ndim - 1)))
