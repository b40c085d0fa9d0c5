"""Every dataset kind, on real files written in their real on-disk formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detector import DatasetNotFoundError, load_dataset
from detector.datasets import CIFAR10_CLASSES


def test_digits_is_embedded_and_split(digits_train, digits_test):
    assert digits_train.input_shape == (1, 8, 8)
    assert len(digits_train) + len(digits_test) == 1797
    assert digits_train.classes == [str(i) for i in range(10)]
    x, y = digits_train[0]
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert isinstance(y, int)
    train_images = {bytes(img.numpy()) for img in digits_train.images}
    assert not any(bytes(img.numpy()) in train_images for img in digits_test.images[:50])


def test_cifar10_from_torchvision_on_disk_format(fake_cifar10):
    train = load_dataset("cifar10", train=True, root=fake_cifar10)
    test = load_dataset("cifar10", train=False, root=fake_cifar10)
    assert len(train) == 200 and len(test) == 40
    assert train.input_shape == (3, 32, 32) and train.classes == list(CIFAR10_CLASSES)
    assert train.images.dtype == torch.uint8


def test_cifar_missing_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path / "nowhere")
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "nowhere" in message and "--download" in message
    assert "download=True" not in message  # torchvision's keyword, which a command-line user never sees


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    # A refused connection stands in for "no internet", without touching the network.
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(DatasetNotFoundError, match="could not download cifar100"):
        load_dataset("cifar100", root=tmp_path, download=True)


def test_npz_folder_and_single_file(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        np.savez(tmp_path / f"toy_{split}.npz", x=rng.integers(0, 256, (n, 12, 10, 3), dtype=np.uint8),
                 y=rng.integers(0, 4, n))
    data = load_dataset(f"npz:{tmp_path}", train=False)
    assert len(data) == 10 and data.input_shape == (3, 12, 10) and data.classes == ["0", "1", "2", "3"]
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    assert load_dataset(f"npz:{tmp_path}").classes == ["a", "b", "c", "d"]

    single = tmp_path / "one.npz"
    np.savez(single, x_train=rng.integers(0, 256, (5, 8, 8), dtype=np.uint8), y_train=np.arange(5),
             x_test=rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), y_test=np.array([0, 4]),
             classes=np.array(list("vwxyz")))
    grey = load_dataset(f"npz:{single}", train=True)
    assert grey.input_shape == (1, 8, 8) and grey.classes == list("vwxyz")
    with pytest.raises(DatasetNotFoundError):
        load_dataset(f"npz:{tmp_path / 'absent'}")


def test_npz_rejects_float_pixels(tmp_path):
    np.savez(tmp_path / "f_train.npz", x=np.zeros((2, 4, 4), np.float32), y=np.zeros(2, int))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(f"npz:{tmp_path}")


def test_image_folder_with_and_without_split(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "split" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    train = load_dataset(f"folder:{tmp_path / 'split'}")
    assert len(train) == 6 and train.classes == ["cat", "dog"] and train.input_shape == (3, 16, 16)

    for cls in ("a", "b"):
        folder = tmp_path / "flat" / cls
        folder.mkdir(parents=True)
        for i in range(5):
            size = (10, 10) if i else (14, 12)  # odd sizes are resized to the first image's
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    tr = load_dataset(f"folder:{tmp_path / 'flat'}", train=True)
    te = load_dataset(f"folder:{tmp_path / 'flat'}", train=False)
    assert len(tr) + len(te) == 10 and len(te) == 2
    assert tr.input_shape == te.input_shape == (1, 14, 12)  # a/0.png, the first image, sets it


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_rebuilt_cifar10_from_shared_data(cifar10_npz):
    test = load_dataset(f"npz:{cifar10_npz}", train=False)
    assert len(test) == 10_000 and test.input_shape == (3, 32, 32)
    assert test.classes == list(CIFAR10_CLASSES)
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the official first labels
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_large_images_are_shrunk_before_conversion_with_the_answer_of_a_direct_resize():
    """The two-step resize (integer reduction in the upload's own mode, then bilinear) answers as a
    direct bilinear resize does, to within a few grey levels at the sharpest edges; 16-bit images are
    block-averaged before they become floats, and agree with their 8-bit twin as closely."""
    from PIL import Image

    from detector.images import to_model_array

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (16, 16)), np.ones((64, 64))).astype(np.uint8)  # 1024×1024 blocks
    im = Image.fromarray(smooth, "L")
    direct = np.asarray(im.resize((32, 32), Image.BILINEAR)).astype(int)

    def close(a):
        diff = np.abs(a.astype(int) - direct)
        return diff.max() <= 4 and diff.mean() < 1.0

    assert close(to_model_array(im, 1, (32, 32))[..., 0])
    wide = Image.frombytes("I;16", im.size, (smooth.astype("<u2") * 257).tobytes())
    assert close(to_model_array(wide, 1, (32, 32))[..., 0])
    rgb = Image.merge("RGB", [im, im, im])
    assert close(to_model_array(rgb, 3, (32, 32))[..., 0])
    assert np.array_equal(to_model_array(im.resize((40, 40)), 1, (32, 32))[..., 0],  # small: one step, as before
                          np.asarray(im.resize((40, 40)).resize((32, 32), Image.BILINEAR)))
