"""Penultimate features, the per-class Hessian trace ψ and relative sharpness κ.

For a classifier f(x) = softmax(W φ(x) + b) the Hessian of the cross-entropy loss with
respect to the last layer's weight W is (diag(ŷ) − ŷŷᵀ) ⊗ φφᵀ.  Its trace splits per class:
ψ_j = ŷ_j(1 − ŷ_j)·‖φ‖², and Σ_j ψ_j = Tr(H).  Relative sharpness is κ = ‖W‖_F · Σ_j ψ_j.
Everything here is batched and takes the logits and φ that one forward pass already produces.

The detector reads a feature vector per input, chosen by name from :data:`FEATURE_SETS`: ``psi``
(the paper's ψ) or ``curvature`` (both phases of the attack path in the log domain: the sharp
phase near the decision boundary, where confidence drops and κ rises, and the flat valley, where
1 − ŷ_top underflows and κ falls).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "FEATURE_SETS",
    "Analysis",
    "analysis_from",
    "analyze",
    "curvature_features",
    "detector_features",
    "eval_mode",
    "log_psi",
    "output_weight_norm",
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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (batch norm on running statistics, no dropout) and restore its mode.

    A model already in eval mode is left untouched: switching walks every module (~0.5 ms on a
    WRN-28-4), which a prediction path called per batch should not pay."""
    if not model.training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train(True)


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


def output_weight_norm(model: nn.Module, layer: str | None = None) -> float:
    """‖W‖_F of the model's output layer: κ's scale, and a constant of the curvature features."""
    return float(torch.linalg.vector_norm(find_last_linear(model, layer).weight.detach().float()))


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
    """κ from ψ already computed: ‖W‖_F · Σ_j ψ_j, in ψ's dtype, or float32 when that is narrower."""
    if psi_values.is_floating_point() and torch.finfo(psi_values.dtype).bits < 32:
        psi_values = psi_values.float()
    norm = torch.linalg.vector_norm(weight.detach().to(psi_values.dtype))
    return norm * psi_values.sum(dim=1)


def _log_terms(logits: torch.Tensor, phi_sq: torch.Tensor):
    """log ŷ, the top class, log(1 − ŷ_top) and log‖φ‖² (logits and ‖φ‖² in the statistics' dtype)."""
    log_p = torch.log_softmax(logits, dim=1)
    top = log_p.argmax(dim=1, keepdim=True)
    log_rest = log_p.scatter(1, top, float("-inf")).logsumexp(dim=1, keepdim=True)
    log_phi_sq = phi_sq.clamp_min(torch.finfo(phi_sq.dtype).tiny).log()
    return log_p, top, log_rest, log_phi_sq


def _log_psi(log_p: torch.Tensor, top: torch.Tensor, log_rest: torch.Tensor, log_phi_sq: torch.Tensor) -> torch.Tensor:
    log_complement = torch.log1p(-log_p.exp().clamp(max=0.5)).scatter(1, top, log_rest)
    return log_p + log_complement + log_phi_sq.unsqueeze(1)


def log_psi(logits: torch.Tensor, phi_sq: torch.Tensor) -> torch.Tensor:
    """log ψ ``[N, k]`` in the log domain: finite where ψ itself underflows (confident inputs).

    log ψ_j = log ŷ_j + log(1 − ŷ_j) + log‖φ‖²; log(1 − ŷ_j) is ``log1p(−ŷ_j)`` for the classes
    other than the top one (ŷ_j ≤ 0.5 there) and the log-sum-exp of the others' log ŷ for the top.
    Differentiable, so an adaptive attack can follow it.
    """
    dtype = _stat_dtype(logits, phi_sq)
    return _log_psi(*_log_terms(logits.to(dtype), phi_sq.to(dtype)))


def curvature_features(logits: torch.Tensor, phi_sq: torch.Tensor, weight_norm: float) -> torch.Tensor:
    """``[N, k + 5]``: log ψ per class, log κ, log(1 − ŷ_top), the logit margin between the two top
    classes, the entropy of ŷ and log‖φ‖².

    Per class, not sorted: which classes carry the curvature tells the detector more than the sorted
    spectrum does (a one-off comparison on digits, two seeds: more of FGSM, PGD and the adaptive
    attacks flagged at the same false-positive rate, about as much of early-stopped PGD).
    """
    dtype = _stat_dtype(logits, phi_sq)
    logits = logits.to(dtype)
    log_p, top, log_rest, log_phi_sq = _log_terms(logits, phi_sq.to(dtype))
    lp = _log_psi(log_p, top, log_rest, log_phi_sq)
    top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, -1]
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    log_kappa = lp.logsumexp(dim=1) + torch.log(torch.as_tensor(max(weight_norm, 1e-30), dtype=dtype))
    scalars = torch.stack([log_kappa, log_rest.squeeze(1), margin, entropy, log_phi_sq], dim=1)
    return torch.cat([lp, scalars], dim=1)


def _psi_features(logits: torch.Tensor, phi_sq: torch.Tensor, weight_norm: float) -> torch.Tensor:
    dtype = _stat_dtype(logits, phi_sq)
    return _psi_from_probabilities(torch.softmax(logits.to(dtype), dim=1), phi_sq.to(dtype).sqrt().unsqueeze(1))


#: Named feature sets a detector can be fitted on: ``fn(logits, phi_sq, weight_norm) -> [N, F]``.
FEATURE_SETS = {
    "psi": _psi_features,
    "curvature": curvature_features,
}


def detector_features(name: str, logits: torch.Tensor, phi_sq: torch.Tensor, weight_norm: float) -> torch.Tensor:
    """The feature set ``name`` (one of :data:`FEATURE_SETS`) for a batch's logits and ‖φ‖²."""
    try:
        fn = FEATURE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown feature set {name!r}; choose one of {sorted(FEATURE_SETS)}") from None
    return fn(logits, phi_sq, weight_norm)


@dataclass
class Analysis:
    """What one forward pass tells about a batch: logits, softmax, ψ and κ, and φ itself."""

    logits: torch.Tensor
    probabilities: torch.Tensor
    psi: torch.Tensor
    sharpness: torch.Tensor
    phi: torch.Tensor | None = None  # [N, d], in the model's dtype

    @property
    def phi_sq(self) -> torch.Tensor:
        """‖φ‖² per input, in the statistics' dtype."""
        return self.phi.to(self.psi.dtype).pow(2).sum(dim=1)

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)


def analysis_from(logits: torch.Tensor, phi: torch.Tensor, weight: torch.Tensor) -> Analysis:
    """:class:`Analysis` of one forward pass's logits and φ (``weight``: the output layer's)."""
    logits = logits.to(_stat_dtype(logits, phi))
    # One softmax serves both the answer and ψ.
    probabilities = torch.softmax(logits, dim=1)
    values = _psi_from_probabilities(probabilities, phi)
    kappa = sharpness_from_psi(values, weight)
    return Analysis(logits, probabilities, values, kappa, phi)


@torch.inference_mode()
def analyze(model: nn.Module, x: torch.Tensor, layer: str | None = None) -> Analysis:
    """Prediction, ψ and κ of a batch from a single forward pass (no gradients), in eval mode.

    The model may run in reduced precision (e.g. under autocast); ψ and κ are still computed
    in float32.
    """
    linear = find_last_linear(model, layer)
    with eval_mode(model):
        logits, phi = _forward_at(model, linear, x)
    return analysis_from(logits, phi, linear.weight)
