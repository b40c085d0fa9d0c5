"""Classifiers by name, CIFAR-style, with input normalisation inside the model.

Every model here takes pixels in [0, 1]: :class:`ImageClassifier` normalises before the network,
so attacks and the service work in pixel space.  Bring-your-own models are wrapped the same way
(``build_classifier("package.module:factory", ...)``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models import DenseNet, resnet18 as tv_resnet18
from torchvision.models.vgg import cfgs as vgg_cfgs, make_layers

__all__ = [
    "MODELS",
    "ImageClassifier",
    "SmallCNN",
    "WideResNet",
    "build_classifier",
    "build_network",
    "classifier_for_weights",
    "import_factory",
    "load_weights",
]


class ImageClassifier(nn.Module):
    """``net((x − mean) / std)``: a network that takes [0, 1] pixels."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


class SmallCNN(nn.Module):
    """A small CNN that trains on the CPU in seconds (digits) or minutes (CIFAR)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * width, 4 * width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.features(x)))


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        # The projection shortcut takes the pre-activated input (Zagoruyko & Komodakis).
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """CIFAR WideResNet-depth-width: 3 groups of (depth−4)/6 pre-activation basic blocks."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, ...), got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers = []
        in_planes = widths[0]
        for group, planes in enumerate(widths[1:]):
            for i in range(blocks):
                stride = 2 if group > 0 and i == 0 else 1
                layers.append(_PreActBlock(in_planes, planes, stride, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: 3×3 stride-1 first conv, no max-pool."""
    net = tv_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


class VGG11(nn.Module):
    """VGG-11 with batch norm, CIFAR variant: torchvision's feature stack, one linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        features = make_layers(vgg_cfgs["A"], batch_norm=True)
        if in_channels != 3:
            features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.features = features
        # Five 2× poolings: 32×32 inputs end at 1×1; smaller inputs are pooled to 1×1 anyway.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"vgg11 needs inputs of at least 32×32 pixels, got {tuple(x.shape[-2:])}")
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def densenet121_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's DenseNet-121 with the CIFAR stem: 3×3 stride-1 first conv, no max-pool."""
    net = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                   num_classes=num_classes)
    net.features.conv0 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.features.pool0 = nn.Identity()
    return net


def _wrn(num_classes: int = 10, in_channels: int = 3, depth: int = 28, width: int = 4,
         dropout: float = 0.0) -> nn.Module:
    return WideResNet(depth, width, num_classes, in_channels, dropout)


def _cnn(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn": _wrn,
    "resnet18": resnet18_cifar,
    "vgg11": VGG11,
    "densenet121": densenet121_cifar,
    "cnn": _cnn,
}


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:callable"`` to the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"an architecture must be a registered name {sorted(MODELS)} or "
                         f"'package.module:callable', got {spec!r}")
    # Console scripts do not put the working directory on sys.path (``python -m`` does): a user's module
    # beside them is found there, after every installed package, whichever command loads it; and only
    # while it is imported, so that no later import (a server's optional dependency) looks there.
    cwd = os.getcwd()
    searched = cwd not in sys.path
    if searched:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for architecture {spec!r}: {exc}") from exc
    finally:
        if searched and cwd in sys.path:
            sys.path.remove(cwd)
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"{spec!r} is not callable")
    return factory


def build_network(arch: str, num_classes: int, in_channels: int = 3,
                  config: dict[str, Any] | None = None) -> nn.Module:
    """The bare network (no normalisation).

    ``arch`` is a registered name (called with ``num_classes``, ``in_channels`` and ``config``)
    or ``package.module:callable``, called with ``config`` alone: a user's factory already knows
    its own classes and channels, and ``config`` may hold any keyword it takes (even
    ``num_classes``).
    """
    config = dict(config or {})
    if arch in MODELS:
        return MODELS[arch](num_classes=num_classes, in_channels=in_channels, **config)
    net = import_factory(arch)(**config)
    if not isinstance(net, nn.Module):
        raise ValueError(f"{arch!r} returned a {type(net).__name__}, not an nn.Module")
    return net


def build_classifier(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    config: dict[str, Any] | None = None,
) -> ImageClassifier:
    """A network wrapped in :class:`ImageClassifier`; mean 0 and std 1 when not given."""
    mean = [0.0] * in_channels if mean is None else list(mean)
    std = [1.0] * in_channels if std is None else list(std)
    return ImageClassifier(build_network(arch, num_classes, in_channels, config), mean, std)


def weight_problems(module: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not fit ``module`` (missing, unexpected or differently shaped keys, with
    the first few of each), or None when it fits.  Shapes only: ``module`` may live on the meta
    device."""
    if not isinstance(state, dict):
        return f"the weights are a {type(state).__name__}, not a state_dict"
    expected, counters = module.state_dict(), _batch_counters(module)
    missing = [k for k in expected if k not in state and k not in counters]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    problems = [f"{len(items)} {what} ({', '.join(items[:3])}{', …' if len(items) > 3 else ''})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("keys of another shape", shapes)) if items]
    if not problems:
        return None
    return "; ".join(problems) + f" (the network has {len(expected)} keys, the weights {len(state)})"


def _batch_counters(module: nn.Module) -> set[str]:
    """Keys of the BatchNorm batch counters, which checkpoints saved before torch 0.4.1 lack; torch
    itself loads them with the counter at zero (it only matters for momentum=None), and so do we."""
    return {f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats}


def load_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state)``, raising a short :class:`ValueError` when they do not fit
    (:func:`weight_problems`; torch's own message lists every key, kilobytes for a network of another
    architecture)."""
    problem = weight_problems(module, state)
    if problem:
        raise ValueError(problem)
    expected = module.state_dict()
    absent = _batch_counters(module).difference(state)
    module.load_state_dict({**state, **{k: torch.zeros_like(expected[k]) for k in absent}})


#: The construction budget of the current thread (see :func:`_construction_budget`), if any.
_BUDGET = threading.local()


def _count(kind: str, amount: int) -> None:
    budget = getattr(_BUDGET, "left", None)
    if budget is None:
        return
    budget[kind] -= amount
    if budget[kind] < 0:
        raise ValueError(f"the model config builds a network of more than {budget['limit_' + kind]:,} {kind}, "
                         f"more than its weights could fill")


def _on_module(_module, _name, submodule):
    if submodule is not None:
        _count("submodules", 1)


def _on_tensor(_module, _name, tensor):
    if tensor is not None:
        _count("numbers", tensor.numel())


@contextlib.contextmanager
def _construction_budget(modules: int, numbers: int) -> Iterator[None]:
    """Within the block, this thread's new networks may register at most ``modules`` submodules and
    parameters and buffers of ``numbers`` numbers in all; one more raises :class:`ValueError` at once,
    before the rest is built."""
    _BUDGET.left = {"submodules": modules, "numbers": numbers, "limit_submodules": modules, "limit_numbers": numbers}
    handles = [nn.modules.module.register_module_module_registration_hook(_on_module),
               nn.modules.module.register_module_parameter_registration_hook(_on_tensor),
               nn.modules.module.register_module_buffer_registration_hook(_on_tensor)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _BUDGET.left = None


def classifier_for_weights(arch: str, num_classes: int, in_channels: int, mean: Sequence[float] | None,
                           std: Sequence[float] | None, config: dict[str, Any] | None,
                           state: dict[str, torch.Tensor]) -> ImageClassifier:
    """:func:`build_classifier`, loaded with ``state``, for a ``config`` that may not be trusted (a
    bundle's): the network may hold no more modules and numbers than ``state`` could fill (twice its
    keys and its size, and some room), or :class:`ValueError` is raised as soon as it does.  A
    registered architecture is first built on the meta device, which allocates nothing, and checked
    against ``state``; so a config that asks for a network far larger than its weights costs neither
    memory nor time.  A bring-your-own factory, trusted by name, is built once, within the same budget.
    """
    if not isinstance(state, dict):
        raise ValueError(f"the weights are a {type(state).__name__}, not a state_dict")
    numbers = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    budget = (2 * len(state) + 64, 2 * numbers + 2**20)
    if arch in MODELS:
        with torch.device("meta"), _construction_budget(*budget):
            skeleton = build_classifier(arch, num_classes, in_channels, mean, std, config)
        problem = weight_problems(skeleton, state)
        if problem:
            raise ValueError(problem)
    with _construction_budget(*budget):
        model = build_classifier(arch, num_classes, in_channels, mean, std, config)
    load_weights(model, state)
    return model
