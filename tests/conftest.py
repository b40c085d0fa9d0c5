"""Shared fixtures: real data, a real small model trained once per session, a real bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detector import build_classifier, load_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR10_NPZ = SHARED_DATA / "cifar10"


@pytest.fixture(scope="session")
def cifar10_npz() -> Path:
    """The rebuilt CIFAR-10 beside the checkout (present in CI, absent in a user's clone)."""
    if not (CIFAR10_NPZ / "cifar10_test.npz").is_file():
        pytest.skip(f"rebuilt CIFAR-10 not found at {CIFAR10_NPZ} (only the project's CI has it)")
    return CIFAR10_NPZ


@pytest.fixture(scope="session")
def digits_train():
    return load_dataset("digits", train=True)


@pytest.fixture(scope="session")
def digits_test():
    return load_dataset("digits", train=False)


@pytest.fixture(scope="session")
def digits_model(digits_train):
    """The small CNN trained for real on digits (about 2 s on 2 cores, ~99% test accuracy)."""
    from training.classifier import train_classifier

    torch.manual_seed(0)
    mean, std = digits_train.channel_stats()
    model = build_classifier("cnn", digits_train.num_classes, 1, mean, std)
    train_classifier(model, digits_train, epochs=8, batch_size=64, lr=0.05, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory) -> Path:
    """The embedded default bundle (cnn on digits), built once by the real training pipeline."""
    from training.pipeline import TrainOptions, run

    out = tmp_path_factory.mktemp("bundle") / "default"
    run(TrainOptions(out=str(out), progress=False))
    return out
