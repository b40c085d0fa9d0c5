"""Shared fixtures: real data, a real small model trained once per session, a real bundle."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import build_classifier, load_dataset
from detector.datasets import CIFAR10_CLASSES

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


@pytest.fixture(scope="session")
def layers_bundle(tmp_path_factory) -> Path:
    """The layers detector (boosted trees on distances) on the default recipe."""
    from training.pipeline import TrainOptions, run

    out = tmp_path_factory.mktemp("bundle") / "layers"
    run(TrainOptions(detector="layers", evaluate="none", out=str(out), progress=False))
    return out


@pytest.fixture()
def fake_cifar10(tmp_path, monkeypatch) -> Path:
    """A small copy of CIFAR-10 in torchvision's on-disk format (``cifar-10-batches-py``: pickled
    batches, same keys and dtypes), 40 images per batch, learnable (each class its own colour).

    torchvision checks every file against the official MD5s; the fixture registers the copy's own,
    so torchvision's real loader, integrity check included, reads it.  Returns the data root.
    """
    import torchvision.datasets

    root = tmp_path / "cifar-data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    palette = rng.uniform(0.15, 0.85, (10, 3))
    n = 40
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, n)
        x = palette[labels][:, :, None] + rng.normal(0, 0.05, (n, 3, 1024))
        batch = {"batch_label": name, "labels": labels.tolist(),
                 "data": np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).reshape(n, 3072),
                 "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": n}, f)

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, md5(name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})
    return root
