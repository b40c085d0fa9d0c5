"""Penultimate features, the per-class Hessian trace ψ and relative sharpness κ.

For a classifier f(x) = softmax(W φ(x) + b) the Hessian of the cross-entropy loss with
respect to the last layer's weight W is (diag(ŷ) − ŷŷᵀ) ⊗ φφᵀ.  Its trace splits per class:
ψ_j = ŷ_j(1 − ŷ_j)·‖φ‖², and Σ_j ψ_j = Tr(H).  Relative sharpness is κ = ‖W‖_F · Σ_j ψ_j.
Everything here is batched and takes the logits and φ that one forward pass already produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Analysis",
    "analyze",
    "find_last_linear",
    "forward_features",
    "psi",
    "relative_sharpness",
    "sharpness_from_psi",
]


def find_last_linear(model: nn.Module, layer: str | None = None) -> nn.Linear:
    """The classifier's output layer: the last ``nn.Linear`` registered, or the one named ``layer``."""
    if layer is not None:
        try:
            module = model.get_submodule(layer)
        except AttributeError as exc:
            raise ValueError(f"model has no submodule named {layer!r}") from exc
        if not isinstance(module, nn.Linear):
            raise ValueError(f"submodule {layer!r} is a {type(module).__name__}, not an nn.Linear")
        return module
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; pass layer=<name> of its output layer"
        )
    return last


def forward_features(
    model: nn.Module, x: torch.Tensor, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning ``(logits, phi)``.

    ``phi`` is the input of the model's last linear layer, captured with a forward hook, so any
    ``nn.Module`` works unchanged.  It is flattened to ``[N, d]``.  Gradients flow through both
    outputs (the attack needs the logits' graph); detach them where they are only read.
    """
    return _forward_at(model, find_last_linear(model, layer), x)


def _forward_at(model: nn.Module, linear: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_features` with the output layer already looked up (callers that run many passes)."""
    captured: list[torch.Tensor] = []

    def hook(_module, inputs):
        captured.append(inputs[0])

    handle = linear.register_forward_pre_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the layer {type(linear).__name__} was not called in the forward pass")
    phi = captured[-1]
    if logits.ndim != 2 or phi.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected logits of shape [N, k] and phi with N rows; got {tuple(logits.shape)} "
            f"and {tuple(phi.shape)}"
        )
    if linear.out_features != logits.shape[1]:
        raise ValueError(
            f"the last nn.Linear has {linear.out_features} outputs but the model returns "
            f"{logits.shape[1]} logits: pass layer=<name> of the output layer"
        )
    return logits, phi.flatten(1)


def _stat_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 stays float64; every lower precision (bf16, fp16, fp32) is lifted to float32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def psi(logits: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """ψ[n, j] = ŷ_j(1 − ŷ_j)·‖φ_n‖², shape ``[N, k]``, in float32 or float64."""
    dtype = _stat_dtype(logits, phi)
    return _psi_from_probabilities(torch.softmax(logits.to(dtype), dim=1), phi)


def _psi_from_probabilities(probs: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """:func:`psi` from the softmax already taken (in the statistics' dtype)."""
    # 1 − ŷ_j cancels catastrophically for a confident class (ŷ_top rounds to 1 in float32 once its
    # logit leads by ~17, which would zero its share of the trace); for that class take the sum
    # of the other probabilities instead, which is exact to rounding.  Other classes have ŷ ≤ 0.5.
    top = probs.argmax(dim=1, keepdim=True)
    complement = (1.0 - probs).scatter(1, top, probs.scatter(1, top, 0.0).sum(dim=1, keepdim=True))
    phi_sq = phi.flatten(1).to(probs.dtype).pow(2).sum(dim=1, keepdim=True)
    return probs * complement * phi_sq


def relative_sharpness(
    logits: torch.Tensor, phi: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """κ[n] = ‖W‖_F · Σ_j ψ[n, j], shape ``[N]``."""
    return sharpness_from_psi(psi(logits, phi), weight)


def sharpness_from_psi(psi_values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """κ from ψ already computed: ‖W‖_F · Σ_j ψ_j, in ψ's dtype."""
    norm = torch.linalg.vector_norm(weight.detach().to(psi_values.dtype))
    return norm * psi_values.sum(dim=1)


@dataclass
class Analysis:
    """What one forward pass tells about a batch: logits, softmax, φ-derived ψ and κ."""

    logits: torch.Tensor
    probabilities: torch.Tensor
    psi: torch.Tensor
    sharpness: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)


@torch.inference_mode()
def analyze(model: nn.Module, x: torch.Tensor, layer: str | None = None) -> Analysis:
    """Prediction, ψ and κ of a batch from a single forward pass (no gradients).

    The model may run in reduced precision (e.g. under autocast); ψ and κ are still computed
    in float32.
    """
    linear = find_last_linear(model, layer)
    logits, phi = _forward_at(model, linear, x)
    # One softmax serves both the answer and ψ.
    logits = logits.to(_stat_dtype(logits, phi))
    probabilities = torch.softmax(logits, dim=1)
    values = _psi_from_probabilities(probabilities, phi)
    kappa = sharpness_from_psi(values, linear.weight)
    return Analysis(logits, probabilities, values, kappa)
