"""Image datasets as [0, 1] float images with integer labels and class names.

``load_dataset(spec, train=...)`` understands:

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (the embedded default, no download);
- ``cifar10`` / ``cifar100``: through torchvision, from ``root`` (``download=True`` fetches them);
- ``npz:PATH``: a folder with ``*train*.npz`` and ``*test*.npz`` (uint8 ``x`` N×H×W[×C], int ``y``),
  a name prefix ``DIR/NAME`` for ``DIR/NAME_train.npz`` and ``DIR/NAME_test.npz``, or a single
  ``.npz`` holding ``x_train``/``y_train``/``x_test``/``y_test``;
- ``folder:PATH``: torchvision's ImageFolder layout, ``PATH/train/<class>/…`` and
  ``PATH/test/<class>/…`` (or one ``PATH/<class>/…`` tree, split deterministically); labels follow
  the training classes in both splits, images are read as the service reads uploads (upright by
  their EXIF orientation, first frame), and an unreadable file is an error that names it.

Images are kept as uint8 ``[N, C, H, W]`` and converted to float per batch, so the 50,000 CIFAR
training images take 150 MB, not 600.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import IMAGE_SUFFIXES, image_files, read_image, upright

__all__ = ["CIFAR10_CLASSES", "DatasetNotFoundError", "ImageDataset", "load_dataset", "DATASET_KINDS"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DATASET_KINDS = ("digits", "cifar10", "cifar100", "npz:PATH", "folder:PATH")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for; the message says where to put them."""


class ImageDataset(Dataset):
    """uint8 images ``[N, C, H, W]``, int64 labels ``[N]`` and class names.

    Indexing yields ``(float image in [0, 1], int label)`` as torchvision datasets do;
    :meth:`batch` converts many at once.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], name: str = ""):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.name = name
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images and labels for an index (slice, list or tensor)."""
        return self.images[index].float().div_(255), self.labels[index]

    def subset(self, index) -> "ImageDataset":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the [0, 1] pixels (for the model's normalisation)."""
        x = self.images.float().div_(255).transpose(0, 1).reshape(self.images.shape[1], -1)
        return x.mean(dim=1).tolist(), x.std(dim=1).clamp_min(1e-6).tolist()


def _from_hwc(x: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W or N×H×W×C → uint8 tensor [N, C, H, W]."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be N×H×W or N×H×W×C, got shape {x.shape}")
    if x.shape[-1] not in (1, 3):
        hint = " (it looks like N×C×H×W: transpose to N×H×W×C)" if x.shape[1] in (1, 3) else ""
        raise ValueError(f"images must have 1 or 3 channels last (N×H×W×C), got shape {x.shape}{hint}")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _digits(train: bool, test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to the 0..255 of an 8-bit image, as an uploaded PNG would be.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    idx = order[n_test:] if train else order[:n_test]
    return ImageDataset(_from_hwc(images[idx]), torch.from_numpy(bunch.target[idx]),
                        [str(c) for c in bunch.target_names], "digits")


def _torchvision_cifar(kind: str, root: str, train: bool, download: bool) -> ImageDataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    try:
        data = cls(root=root, train=train, download=download)
    except RuntimeError as exc:
        raise DatasetNotFoundError(
            f"{kind} not found under {os.path.abspath(root)!r}: torchvision expects the folder "
            f"{cls.base_folder!r} there (from {cls.url}, unpacked). Pass --download when online, "
            f"or use an offline copy, e.g. --data npz:PATH."
        ) from exc  # torchvision's own message says "use download=True", a keyword our users never see
    except OSError as exc:  # URLError and socket errors while downloading
        raise DatasetNotFoundError(
            f"could not download {kind} from {cls.url} into {os.path.abspath(root)!r}: {exc}. "
            f"Offline, put the unpacked {cls.base_folder!r} folder there yourself."
        ) from exc
    return ImageDataset(_from_hwc(data.data), torch.as_tensor(data.targets), data.classes, kind)


def _npz_classes(path: Path, x_files: Sequence[Path], arrays, num_classes: int) -> list[str]:
    if "classes" in arrays:
        return [str(c) for c in arrays["classes"]]
    txt = path / "classes.txt" if path.is_dir() else path.with_name("classes.txt")
    if txt.is_file():
        return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    if num_classes == 10 and all(f.name.startswith("cifar10_") for f in x_files):
        return list(CIFAR10_CLASSES)
    return [str(i) for i in range(num_classes)]


def _npz(path_str: str, train: bool) -> ImageDataset:
    path = Path(path_str).expanduser()
    split = "train" if train else "test"
    named = path.parent / f"{path.name}_{split}.npz"
    matches = sorted(path.glob(f"*{split}*.npz")) if path.is_dir() else []
    if len(matches) == 1:
        file, keys = matches[0], ("x", "y")
    elif not matches and named.is_file():  # a name prefix: DIR/NAME_train.npz and DIR/NAME_test.npz
        file, keys = named, ("x", "y")
    elif path.is_dir():
        raise DatasetNotFoundError(
            f"expected exactly one *{split}*.npz in {str(path)!r}, found {[m.name for m in matches]}; "
            f"name a pair of files by their prefix, e.g. npz:{path / 'cifar10'} for cifar10_{split}.npz"
        )
    elif path.is_file():
        file, keys = path, (f"x_{split}", f"y_{split}")
    else:
        raise DatasetNotFoundError(f"no npz file, folder or {named.name} at {str(path)!r}")
    with np.load(file, allow_pickle=False) as arrays:
        for key in keys:
            if key not in arrays:
                raise ValueError(f"{file} has no array {key!r} (it has {list(arrays.keys())})")
        x, y = arrays[keys[0]], arrays[keys[1]]
        classes_src = {k: arrays[k] for k in arrays.keys() if k == "classes"}
    files = [file]
    y = np.asarray(y).astype(np.int64)
    if y.ndim == 2 and y.shape[1] == 1:  # Keras keeps labels as a column
        y = y[:, 0]
    num_classes = int(y.max()) + 1 if len(y) else 0
    classes = _npz_classes(path, files, classes_src, num_classes)
    if len(classes) < num_classes:
        raise ValueError(f"{len(classes)} class names for labels up to {num_classes - 1}")
    if np.asarray(x).dtype != np.uint8:
        raise ValueError(f"{files[0]}: images must be uint8 pixels 0–255 (N×H×W or N×H×W×C), got "
                         f"{np.asarray(x).dtype}; convert with np.rint(x * 255).astype(np.uint8) if they are floats "
                         f"in [0, 1]")
    return ImageDataset(_from_hwc(x), torch.from_numpy(y), classes, f"npz:{path}")


#: Folder names that mean a split, not a class: ``PATH/train`` and ``PATH/test`` go together.
SPLIT_FOLDERS = ("train", "test", "val", "valid", "validation")
#: An image larger than this on a side needs an explicit ``image_size`` (a bundle's input is at most 1024).
MAX_NATIVE_SIDE = 1024


def _class_tree(root: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """The class folders under ``root`` (sorted, hidden ones left out) and every image file in them."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(root / name / rel, name) for name in classes for rel in image_files(root / name)]
    return classes, files


def _folder(path_str: str, train: bool, test_fraction: float = 0.2, seed: int = 0,
            image_size: tuple[int, int] | None = None) -> ImageDataset:
    from PIL import Image

    path = Path(path_str).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"no image folder at {str(path)!r}")
    splits = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name.lower() in SPLIT_FOLDERS)
    split_given = {"train", "test"} <= set(splits)
    if splits and not split_given:
        raise DatasetNotFoundError(
            f"{str(path)!r} has {', '.join(s + '/' for s in splits)} but not both train/ and test/: give "
            f"PATH/train/<class>/… and PATH/test/<class>/…, or one PATH/<class>/… tree (split "
            f"{test_fraction:.0%} for testing); a class may not be named {' or '.join(SPLIT_FOLDERS)}")
    # Labels index the training classes, in both splits: a test/ tree with fewer classes keeps them.
    classes, samples = _class_tree(path / "train" if split_given else path)
    if not classes:
        raise DatasetNotFoundError(f"{str(path)!r} is not an image folder tree (<class>/<image>): no class folders")
    empty = sorted(set(classes) - {name for _, name in samples})
    if empty:
        raise DatasetNotFoundError(f"class folder(s) {empty[:5]} under {str(path)!r} hold no image files "
                                   f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    if split_given:
        test_classes, test_samples = _class_tree(path / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DatasetNotFoundError(f"test/ has classes that train/ lacks: {unknown[:5]}; a classifier cannot "
                                       f"learn them")
        shared = {os.path.realpath(f) for f, _ in samples} & {os.path.realpath(f) for f, _ in test_samples}
        if shared:
            raise DatasetNotFoundError(f"{len(shared)} image file(s) are in both train/ and test/ (through links), "
                                       f"e.g. {sorted(shared)[0]!r}: a test image must not be trained on")
        reference = samples[0][0]
        if not train:
            samples = test_samples
    else:
        reference = samples[0][0]
        order = np.random.default_rng(seed).permutation(len(samples))
        n_test = int(round(len(samples) * test_fraction))
        keep = order[n_test:] if train else order[:n_test]
        samples = [samples[i] for i in sorted(keep)]
    # Both splits take their shape from the first training image (or ``image_size``): grey trees
    # stay grey, others become RGB, and images of another size are resized to it.
    try:
        with Image.open(reference) as im:
            channels = 1 if im.mode in ("L", "1", "I", "F") or im.mode.startswith("I;16") else 3
            width, height = upright(im).size
    except Exception as exc:  # noqa: BLE001 -- the message names the file
        raise ValueError(f"the first training image {str(reference)!r} is not a readable image: "
                         f"{type(exc).__name__}: {exc}") from exc
    if image_size is None and max(height, width) > MAX_NATIVE_SIDE:
        raise ValueError(f"the images are {height}×{width} pixels (the first training image, "
                         f"{str(reference)!r}); more than {MAX_NATIVE_SIDE} on a side needs an image size to resize to")
    size = (height, width) if image_size is None else tuple(image_size)
    arrays, labels, unreadable = [], [], []
    for file, name in samples:
        try:
            arrays.append(read_image(file, channels, size))
            labels.append(classes.index(name))
        except Exception as exc:  # noqa: BLE001 -- collected and reported together below
            unreadable.append(f"{file} ({type(exc).__name__}: {str(exc)[:120]})")
    if unreadable:
        raise ValueError(f"{len(unreadable)} file(s) under {str(path)!r} are not readable images; fix or remove "
                         f"them: " + "; ".join(unreadable[:5]) + ("; …" if len(unreadable) > 5 else ""))
    if not arrays:
        raise DatasetNotFoundError(f"no images found for the {'train' if train else 'test'} split under {str(path)!r}")
    return ImageDataset(_from_hwc(np.stack(arrays)), torch.tensor(labels), classes, f"folder:{path}")


def load_dataset(
    spec: str,
    train: bool = True,
    root: str | os.PathLike = "data",
    download: bool = False,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> ImageDataset:
    """Load the train or test split of ``spec`` (see the module docstring for the kinds).

    ``image_size`` = ``(height, width)`` resizes ``folder:`` images (default: the first training
    image's size); the other kinds have a fixed size and refuse it.
    """
    if image_size is not None:
        if spec.partition(":")[0] != "folder":
            raise ValueError(f"an image size applies to folder: data only, not {spec!r}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image size must be (height, width) of positive pixels, got {image_size}")
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _digits(train, seed=seed)
    if kind in ("cifar10", "cifar100") and not arg:
        return _torchvision_cifar(kind, str(root), train, download)
    if kind == "npz" and arg:
        return _npz(arg, train)
    if kind == "folder" and arg:
        return _folder(arg, train, seed=seed, image_size=image_size)
    raise ValueError(f"unknown dataset {spec!r}; expected one of {', '.join(DATASET_KINDS)}")
