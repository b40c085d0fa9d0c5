"""Every dataset kind, on real files written in their real on-disk formats."""

from __future__ import annotations

from pathlib import Path

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


def _png(path, rng, size=(16, 16, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path)


def test_image_folder_test_labels_follow_the_training_classes(tmp_path):
    """A test/ tree with fewer classes keeps the training classes' labels; a class only test/ has is refused."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        for i in range(2):
            _png(tmp_path / "train" / cls / f"{i}.png", rng)
    for cls in ("dog", "eel"):
        _png(tmp_path / "test" / cls / "0.png", rng)
    test = load_dataset(f"folder:{tmp_path}", train=False)
    assert test.classes == ["cat", "dog", "eel"] and test.labels.tolist() == [1, 2]
    _png(tmp_path / "test" / "fox" / "0.png", rng)
    with pytest.raises(DatasetNotFoundError, match="fox"):
        load_dataset(f"folder:{tmp_path}", train=False)


@pytest.mark.parametrize("splits", [("train",), ("train", "val"), ("test",)])
def test_image_folder_with_a_split_missing_is_refused(tmp_path, splits):
    """train/ alone would otherwise be read as a class named 'train' and every label would be 0."""
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("cat", "dog"):
            _png(tmp_path / split / cls / "0.png", rng)
    with pytest.raises(DatasetNotFoundError, match="not both train/ and test/"):
        load_dataset(f"folder:{tmp_path}")


def test_image_folder_reads_files_as_the_service_does(tmp_path):
    """EXIF orientation applied, GIFs read, hidden files and folders (macOS ._ forks) and dangling links left
    out, a link loop followed once; an unreadable image is an error naming it."""
    import os

    rng = np.random.default_rng(0)
    for i in range(3):
        _png(tmp_path / "a" / f"{i}.png", rng, (10, 20, 3))
    sideways = Image.new("L", (20, 10), 0)
    sideways.paste(255, (0, 0, 10, 10))  # left half white as stored; EXIF says: turn 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "b").mkdir()
    sideways.save(tmp_path / "b" / "0.jpg", exif=exif.tobytes(), quality=100)
    Image.fromarray(rng.integers(0, 256, (10, 20), dtype=np.uint8)).save(tmp_path / "b" / "1.gif")
    (tmp_path / "b" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".thumbnails").mkdir()
    _png(tmp_path / ".thumbnails" / "x.png", rng)
    os.symlink(tmp_path / "absent.png", tmp_path / "b" / "gone.png")
    os.symlink(tmp_path / "b", tmp_path / "b" / "loop")
    data = load_dataset(f"folder:{tmp_path}", train=True, image_size=(20, 10), seed=0)
    everything = torch.cat([data.images, load_dataset(f"folder:{tmp_path}", train=False, image_size=(20, 10),
                                                      seed=0).images])
    assert data.classes == ["a", "b"] and len(everything) == 5  # 3 PNGs, the JPEG, the GIF
    upright = everything[[i for i in range(5) if everything[i, 0, :10].float().mean() > 200]]
    assert len(upright) == 1 and upright[0, 0, 10:].float().mean() < 50  # the white half is on top
    (tmp_path / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(ValueError, match=r"not readable images.*2\.png"):
        load_dataset(f"folder:{tmp_path}", train=True, image_size=(20, 10))


def test_image_folder_refuses_a_test_image_linked_into_train(tmp_path):
    import os

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            _png(tmp_path / split / cls / "0.png", rng)
    os.symlink(tmp_path / "test" / "dog", tmp_path / "train" / "dog" / "more")
    with pytest.raises(DatasetNotFoundError, match="both train/ and test/"):
        load_dataset(f"folder:{tmp_path}")


def test_image_folder_of_large_images_asks_for_a_size_before_decoding_them(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        _png(tmp_path / cls / "0.png", rng, (1100, 8, 3))
    with pytest.raises(ValueError, match="1100×8 pixels"):
        load_dataset(f"folder:{tmp_path}")
    assert load_dataset(f"folder:{tmp_path}", image_size=(16, 16), train=True).input_shape == (3, 16, 16)


def test_npz_names_a_pair_by_prefix_and_refuses_channels_first(tmp_path):
    rng = np.random.default_rng(0)
    for name, shape in (("small", (6, 8, 8, 3)), ("other", (4, 5, 5))):
        for split in ("train", "test"):
            np.savez(tmp_path / f"{name}_{split}.npz", x=rng.integers(0, 256, shape, dtype=np.uint8),
                     y=rng.integers(0, 2, (shape[0], 1)))  # labels as a column, as Keras keeps them
    with pytest.raises(DatasetNotFoundError, match="exactly one"):
        load_dataset(f"npz:{tmp_path}")
    small = load_dataset(f"npz:{tmp_path / 'small'}", train=False)
    assert small.input_shape == (3, 8, 8) and small.labels.shape == (6,)
    np.savez(tmp_path / "nchw_train.npz", x=rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), y=np.zeros(4, int))
    with pytest.raises(ValueError, match="transpose"):
        load_dataset(f"npz:{tmp_path / 'nchw'}")


def test_cifar_npz_copy_beside_another_datasets_files(tmp_path):
    """--data cifar10 finds cifar10_*.npz in --data-dir also when cifar100's pair lies beside it."""
    from training.options import TrainOptions
    from training.prepare import load_splits

    rng = np.random.default_rng(0)
    for kind, n in (("cifar10", 12), ("cifar100", 7)):
        for split in ("train", "test"):
            np.savez(tmp_path / f"{kind}_{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                     y=np.arange(n) % 10)
    (tmp_path / "cifar10").mkdir()  # a folder named after the dataset, holding something else
    train, test, _, source = load_splits(TrainOptions(data="cifar10", data_dir=str(tmp_path)))
    assert len(train) == len(test) == 12 and train.classes == list(CIFAR10_CLASSES) and "npz copy" in source


def test_image_files_are_listed_in_image_folder_order(tmp_path):
    """Positions in a split are what split.json records: the listing keeps torchvision's ImageFolder order
    (a folder's own files, then each subfolder's), so bundles made with it name the same images."""
    from torchvision.datasets import ImageFolder

    from detector.images import image_files

    rng = np.random.default_rng(0)
    for rel in ("a.png", "z.png", "sub/b.png", "a-b/c.png", "a b/d.png", "sub/deeper/e.png", "Zed.png"):
        _png(tmp_path / "cat" / rel, rng, (4, 4, 3))
    ours = [f"cat/{rel}" for rel in image_files(tmp_path / "cat")]
    theirs = [Path(f).relative_to(tmp_path).as_posix() for f, _ in ImageFolder(str(tmp_path)).samples]
    assert ours == theirs
