"""ψ and κ against the exact Hessian; φ capture for shipped and foreign models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from detector import analyze, find_last_linear, forward_features, psi, relative_sharpness
from detector.models import SmallCNN


def exact_hessian_blocks(phi: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, label: int):
    """Hessian of CE(W φ + b, label) w.r.t. W by autograd, float64, shape [k, d, k, d]."""

    def loss(w):
        return F.cross_entropy((phi @ w.T + bias).unsqueeze(0), torch.tensor([label]))

    return torch.autograd.functional.hessian(loss, weight)


@pytest.mark.parametrize("k,d,seed", [(2, 3, 0), (10, 16, 1), (7, 40, 2), (100, 8, 3), (10, 64, 4)])
def test_psi_is_per_class_trace_of_exact_hessian(k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(k, generator=gen, dtype=torch.float64)
    phi = torch.randn(4, d, generator=gen, dtype=torch.float64)
    logits = phi @ weight.T + bias
    # The autograd reference forms ŷ_j − ŷ_j² and so loses digits as 1 − ŷ_max → 0 (relative error
    # ≈ 1e-16 / (1 − ŷ_max)); keep it well conditioned. The confident regime is tested below.
    assert float(torch.softmax(logits, 1).max()) < 1 - 1e-6
    values = psi(logits, phi)
    kappa = relative_sharpness(logits, phi, weight)
    assert values.dtype == torch.float64 and values.shape == (4, k)
    for n in range(4):
        label = int(torch.randint(k, (1,), generator=gen))
        hess = exact_hessian_blocks(phi[n], weight, bias, label)
        block_traces = torch.einsum("jiji->j", hess)  # trace of each class's d×d diagonal block
        trace = block_traces.sum()
        assert torch.allclose(values[n], block_traces, rtol=1e-8, atol=1e-300)
        assert abs(values[n].sum() - trace) / trace <= 1e-8
        assert abs(kappa[n] - torch.linalg.norm(weight) * trace) / kappa[n] <= 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_psi_of_real_model_matches_exact_hessian(seed):
    """Whole model: φ from the hook, then the exact Hessian w.r.t. the real fc weight."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10, in_channels=3, width=8).double().eval()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    logits, phi = forward_features(model, x)
    values = psi(logits, phi)
    for n in range(3):
        hess = exact_hessian_blocks(phi[n].detach(), model.fc.weight.detach(), model.fc.bias.detach(), n)
        trace = torch.einsum("jiji->", hess)
        assert abs(values[n].sum() - trace) / trace <= 1e-8


def test_forward_features_captures_input_of_last_linear():
    torch.manual_seed(0)
    model = SmallCNN(10, 3, width=8).eval()
    x = torch.rand(5, 3, 32, 32)
    logits, phi = forward_features(model, x)
    expected_phi = model.head(model.features(x))
    assert torch.equal(phi, expected_phi)
    assert torch.equal(logits, model.fc(expected_phi))


def test_forward_features_on_unmodified_torchvision_model():
    model = resnet18(weights=None, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    logits, phi = forward_features(model, x)
    assert logits.shape == (2, 10) and phi.shape == (2, 512)
    assert find_last_linear(model) is model.fc


def test_layer_override_and_clear_errors():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 5)
            self.out = nn.Linear(5, 3)
            self.aux = nn.Linear(5, 7)  # registered last, but not the output layer

        def forward(self, x):
            h = torch.relu(self.body(x))
            self.aux(h)
            return self.out(h)

    model = TwoHeads()
    x = torch.rand(4, 6)
    with pytest.raises(ValueError, match="pass layer="):
        forward_features(model, x)
    logits, phi = forward_features(model, x, layer="out")
    assert logits.shape == (4, 3) and phi.shape == (4, 5)
    with pytest.raises(ValueError, match="no submodule"):
        forward_features(model, x, layer="nope")
    with pytest.raises(ValueError, match="no nn.Linear"):
        forward_features(nn.Sequential(nn.Flatten()), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_statistics_are_float32_or_better_for_low_precision_models(dtype):
    torch.manual_seed(0)
    model = SmallCNN(10, 3, width=8).eval()
    x = torch.rand(4, 3, 16, 16)
    reference = analyze(model, x)
    low = analyze(model.to(dtype), x.to(dtype))
    assert low.psi.dtype == torch.float32 and low.sharpness.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert torch.allclose(low.sharpness, reference.sharpness, rtol=tolerance)
    # κ from a ψ the caller kept in the model's precision is still float32 or better
    from detector.features import sharpness_from_psi

    kappa = sharpness_from_psi(reference.psi.to(dtype), model.fc.weight)
    assert kappa.dtype == torch.float32 and torch.allclose(kappa, reference.sharpness, rtol=tolerance)
    assert sharpness_from_psi(reference.psi.double(), model.fc.weight.float()).dtype == torch.float64


def test_analyze_agrees_with_the_functions_it_composes():
    torch.manual_seed(0)
    model = SmallCNN(10, 1, width=8).eval()
    x = torch.rand(6, 1, 8, 8)
    result = analyze(model, x)
    logits, phi = forward_features(model, x)
    assert torch.allclose(result.psi, psi(logits, phi))
    assert torch.allclose(result.sharpness, relative_sharpness(logits, phi, model.fc.weight))
    assert torch.allclose(result.probabilities.sum(1), torch.ones(6))
    assert torch.equal(result.predictions, logits.argmax(1))


@pytest.mark.parametrize("gap", [5.0, 20.0, 40.0, 80.0])
def test_confident_inputs_keep_their_top_class_share_in_float32(gap):
    """ŷ_top rounds to 1.0 in float32 for large logit gaps; ψ_top must not collapse to 0."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=gen, dtype=torch.float64)
    logits[:, 3] += gap
    phi = torch.randn(8, 32, generator=gen, dtype=torch.float64)
    # Reference in float64 with the complement written as the sum of the other classes.
    p = torch.softmax(logits, dim=1)
    expected_top = p[:, 3] * (p[:, :3].sum(1) + p[:, 4:].sum(1)) * phi.pow(2).sum(1)
    got = psi(logits.float(), phi.float())
    assert got.dtype == torch.float32
    assert torch.allclose(got[:, 3].double(), expected_top, rtol=1e-4, atol=0)
    # The top class carries half the trace when all others are tiny: Σ_{j≠top} ψ_j ≈ ψ_top.
    if gap >= 20:
        assert torch.allclose(got.sum(1).double(), 2 * expected_top, rtol=1e-3)


def test_empty_batch():
    logits, phi = torch.empty(0, 10), torch.empty(0, 32)
    assert psi(logits, phi).shape == (0, 10)
    assert relative_sharpness(logits, phi, torch.ones(10, 32)).shape == (0,)
