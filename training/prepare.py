"""The first stage: load the data, then build, load and/or train the classifier.

``detector-train`` and ``detector-trajectory`` both start here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector import (
    ImageClassifier,
    ImageDataset,
    InputSpec,
    analyze,
    distributed,
    load_dataset,
)
from detector.bundle import MAX_INPUT_SIDE
from detector.datasets import DatasetNotFoundError
from detector.models import MODELS, build_network, load_weights

from .classifier import (
    AdversarialTraining,
    accuracy,
    predict,
    robust_accuracy,
    train_classifier,
)
from .options import (
    DEFAULT_EPOCHS,
    DEFAULT_EPOCHS_OTHER,
    PipelineError,
    TrainOptions,
    attack_settings,
    resolve_device,
)
from .output import log

__all__ = ["Prepared", "load_splits", "prepare", "read_state_dict"]


def _npz_fallback(kind: str, data_dir: Path) -> Path | None:
    """A folder under ``data_dir`` holding ``<kind>_train.npz`` and ``<kind>_test.npz``."""
    for folder in (data_dir, data_dir / kind):
        if (folder / f"{kind}_train.npz").is_file() and (folder / f"{kind}_test.npz").is_file():
            return folder
    return None


def load_splits(options: TrainOptions) -> tuple[ImageDataset, ImageDataset, np.ndarray, str]:
    """Train and test split, the test images' positions in the full test split, and a line saying
    where the data came from.

    ``cifar10``/``cifar100`` are read in torchvision's format from ``data_dir``; when that is
    absent but ``data_dir`` (or ``data_dir/<kind>``) holds ``<kind>_train.npz`` and
    ``<kind>_test.npz`` (as ``../shared/data/cifar10`` does), those are used instead.
    """
    spec, root = options.data, Path(options.data_dir)
    kind = spec.partition(":")[0]
    size = None
    if options.image_size is not None:
        size = tuple(options.image_size) * (2 if len(options.image_size) == 1 else 1)
        if kind != "folder" or len(size) != 2 or min(size) < 1:
            raise PipelineError(f"--image-size takes one or two positive sizes and applies to folder: data only "
                                f"(got {list(options.image_size)} for {spec!r})")
    try:
        train = load_dataset(spec, train=True, root=root, download=options.download, seed=options.seed,
                             image_size=size)
        test = load_dataset(spec, train=False, root=root, download=options.download, seed=options.seed,
                            image_size=size)
        source = spec if kind not in ("cifar10", "cifar100") else f"{spec} (torchvision format in {root})"
    except DatasetNotFoundError as exc:
        folder = _npz_fallback(kind, root) if kind in ("cifar10", "cifar100") and spec == kind else None
        if folder is None:
            hint = (f" Or put {kind}_train.npz and {kind}_test.npz in --data-dir, each with uint8 x "
                    f"(N×32×32×3) and integer y (N), in the official order."
                    if kind in ("cifar10", "cifar100") and spec == kind else "")
            raise PipelineError(f"{exc}{hint}") from exc
        train = load_dataset(f"npz:{folder / kind}", train=True)
        test = load_dataset(f"npz:{folder / kind}", train=False)
        source = f"{spec} (npz copy in {folder})"
    generator = torch.Generator().manual_seed(options.seed)
    for flag, n in (("--train-samples", options.train_samples), ("--test-samples", options.test_samples)):
        if n is not None and n < 1:
            raise PipelineError(f"{flag} must be at least 1")
    if options.train_samples is not None and options.train_samples < len(train):
        train = train.subset(torch.randperm(len(train), generator=generator)[: options.train_samples].sort().values)
    test_origin = np.arange(len(test))
    if options.test_samples is not None and options.test_samples < len(test):
        keep = torch.randperm(len(test), generator=generator)[: options.test_samples].sort().values
        test, test_origin = test.subset(keep), keep.numpy()
    if len(train) == 0 or len(test) == 0:
        raise PipelineError(f"dataset {spec!r} has an empty split ({len(train)} train, {len(test)} test)")
    if train.input_shape != test.input_shape:
        raise PipelineError(f"train images are {train.input_shape}, test images {test.input_shape}")
    if max(train.input_shape[1:]) > MAX_INPUT_SIDE:
        raise PipelineError(f"the images are {train.input_shape[1]}×{train.input_shape[2]} pixels; a bundle takes at "
                            f"most {MAX_INPUT_SIDE} on a side: give --image-size")
    if kind == "folder":
        c, h, w = train.input_shape
        how = "--image-size" if size is not None else "the first training image's size; --image-size changes it"
        log(f"images: {h}×{w} pixels, {c} channel{'s' if c > 1 else ''} ({how})")
    return train, test, test_origin, source



_STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network", "weights")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from ``path``: the file's dict itself, or the one a checkpoint holds under a
    usual key (``state_dict``, ``model_state_dict``, ``model``…), with ``module.`` (DataParallel)
    and ``_orig_mod.`` (torch.compile) prefixes stripped.  Loaded with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--weights: no file at {str(path)!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything beyond tensors and plain containers
        raise PipelineError(
            f"--weights {str(path)!r} cannot be loaded with weights_only=True (it must hold tensors "
            f"and plain containers only, e.g. torch.save(model.state_dict(), ...)): {exc}"
        ) from exc
    state = obj if _is_state_dict(obj) else None
    if state is None and isinstance(obj, dict):
        for key in _STATE_KEYS:
            if _is_state_dict(obj.get(key)):
                state = obj[key]
                break
    if state is None:
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise PipelineError(f"--weights {str(path)!r} holds no state_dict (found {keys}); expected a "
                            f"state_dict or a checkpoint dict with one under {list(_STATE_KEYS)}")
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _model_config(options: TrainOptions) -> tuple[str, dict[str, Any]]:
    """Architecture string and config for :func:`detector.models.build_network`."""
    if options.arch is not None:
        if options.depth is not None or options.width is not None:
            raise PipelineError("--depth/--width apply to the built-in wrn/cnn; pass a bring-your-own "
                                "model's arguments with --arch-kwargs")
        return options.arch, dict(options.arch_kwargs)
    if options.model not in MODELS:
        raise PipelineError(f"--model must be one of {sorted(MODELS)}, got {options.model!r}")
    if options.arch_kwargs:
        raise PipelineError("--arch-kwargs applies to --arch (bring your own) only")
    if options.model == "wrn":
        return "wrn", {"depth": 28 if options.depth is None else options.depth,
                       "width": 4 if options.width is None else options.width}
    if options.depth is not None:
        raise PipelineError(f"--depth applies to wrn only, not {options.model}")
    if options.model == "cnn":
        return "cnn", {"width": 32 if options.width is None else options.width}
    if options.width is not None:
        raise PipelineError(f"--width applies to wrn and cnn only, not {options.model}")
    return options.model, {}


def _normalisation(options: TrainOptions, train: ImageDataset, trained_here: bool,
                   state: dict[str, torch.Tensor] | None) -> tuple[list[float], list[float], str]:
    channels = train.input_shape[0]
    if (options.mean is None) != (options.std is None):
        raise PipelineError("give --mean and --std together")
    if options.mean is not None:
        mean, std, source = list(options.mean), list(options.std), "given"
    elif state is not None and "mean" in state and "std" in state:
        mean, std, source = state["mean"].flatten().tolist(), state["std"].flatten().tolist(), "weights file"
    elif trained_here and options.weights is None:
        mean, std = train.channel_stats()
        source = "training split"
    else:
        mean, std, source = [0.0] * channels, [1.0] * channels, "none (model takes [0, 1] pixels)"
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise PipelineError(f"--mean/--std have {len(mean)}/{len(std)} values; the images have {channels} channels")
    if any(s <= 0 for s in std):
        raise PipelineError(f"--std must be positive, got {std}")
    return [float(v) for v in mean], [float(v) for v in std], source


def _resolve_layer(model: ImageClassifier, layer: str | None) -> str | None:
    """``--layer`` names a module of the user's network; inside the wrapper it is ``net.<name>``."""
    if layer is None:
        return None
    for name in (layer, f"net.{layer}") if layer.startswith("net.") else (f"net.{layer}",):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    raise PipelineError(f"--layer {layer!r}: the network has no submodule of that name")


def _check_outputs(model: ImageClassifier, data: ImageDataset, layer: str | None, arch: str) -> None:
    """One forward pass: the logits must have one column per class and ψ must be computable."""
    x, _ = data.batch(slice(0, 2))
    try:
        result = analyze(model.eval(), x, layer)
    except Exception as exc:
        hint = "" if layer else " (if its output layer is not its last nn.Linear, name it with --layer NAME)"
        raise PipelineError(f"{arch} cannot classify {tuple(data.input_shape)} images with the output "
                            f"layer {layer or '(last nn.Linear)'}: {exc}{hint}") from exc
    if result.logits.shape[1] != data.num_classes:
        raise PipelineError(f"{arch} returns {result.logits.shape[1]} logits but the dataset has "
                            f"{data.num_classes} classes")


@dataclass
class Prepared:
    """What :func:`prepare` hands on: the data, the classifier and what was measured so far."""

    train: ImageDataset
    test: ImageDataset
    test_origin: np.ndarray  # position of each test image in the full test split
    test_correct: np.ndarray  # whether the classifier gets each test image right
    model: ImageClassifier
    layer: str | None  # the output layer's name inside the ImageClassifier, None = last nn.Linear
    architecture: str
    model_config: dict[str, Any]
    input_spec: InputSpec
    device: torch.device
    info: dict[str, Any]  # report sections "data" and "classifier"
    timing: dict[str, float]


#: Test images the robust accuracy of an adversarially trained classifier is measured on.
ROBUST_ACCURACY_IMAGES = 1000


def adversarial_training(options: TrainOptions, epochs: int) -> AdversarialTraining | None:
    """The attack to train on, or None for standard training."""
    if options.adversarial_training is None:
        for value, flag in ((options.train_eps, "--train-eps"), (options.train_steps, "--train-steps")):
            if value is not None:
                raise PipelineError(f"{flag} sets --adversarial-training, which was not given")
        return None
    if options.train_steps is not None and options.adversarial_training != "pgd":
        raise PipelineError("--train-steps applies to --adversarial-training pgd (fast takes one step)")
    if epochs == 0:
        raise PipelineError("--adversarial-training trains the classifier, but --epochs is 0")
    attack = attack_settings(options)
    eps = attack.eps if options.train_eps is None else float(options.train_eps)
    try:
        steps = 7 if options.train_steps is None else options.train_steps
        return AdversarialTraining(options.adversarial_training, eps, steps, attack.norm)
    except ValueError as exc:
        raise PipelineError(f"--adversarial-training: {exc}") from exc


def prepare(options: TrainOptions) -> Prepared:
    """Load the data, then build, load and/or train the classifier and measure its accuracy."""
    timing: dict[str, float] = {}
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    start = time.perf_counter()
    if options.download and distributed.is_distributed():  # one download, not one per rank into one folder
        if distributed.is_main():
            load_splits(options)
        distributed.barrier()
    train, test, test_origin, source = load_splits(options)
    timing["data"] = time.perf_counter() - start

    start = time.perf_counter()
    architecture, config = _model_config(options)
    epochs = options.epochs
    if epochs is None:
        epochs = 0 if options.weights else DEFAULT_EPOCHS.get(options.data, DEFAULT_EPOCHS_OTHER)
    if epochs < 0:
        raise PipelineError("--epochs must be >= 0")
    if epochs == 0 and options.weights is None:
        raise PipelineError("--epochs 0 uses the given weights as they are, but no --weights were given")
    adversary = adversarial_training(options, epochs)
    channels = train.input_shape[0]
    try:
        net = build_network(architecture, train.num_classes, channels, config)
    except Exception as exc:  # noqa: BLE001 -- a factory of the user's may raise anything on its arguments
        raise PipelineError(f"cannot build {architecture!r} with {config}: {type(exc).__name__}: {exc}") from exc
    state = read_state_dict(options.weights) if options.weights else None
    mean, std, norm_source = _normalisation(options, train, epochs > 0, state)
    model = ImageClassifier(net, mean, std)
    if state is not None:
        # A whole ImageClassifier (e.g. a bundle's weights.pt) or the bare network.
        whole = "mean" in state and "std" in state and any(k.startswith("net.") for k in state)
        target = model if whole else net
        if whole:
            state = {**state, "mean": model.mean, "std": model.std}  # given --mean/--std win
        try:
            load_weights(target, state)
        except ValueError as exc:
            hint = (" (the built-in resnet18 is the CIFAR-stem variant: 3×3 first convolution, no max-pool; "
                    "ImageNet weights do not fit it)" if architecture == "resnet18" else "")
            raise PipelineError(f"--weights {options.weights!r} do not fit {architecture!r}: {exc}{hint}") from exc
    layer = _resolve_layer(model, options.layer)
    _check_outputs(model, train, layer, architecture)
    timing["classifier_build"] = time.perf_counter() - start

    start = time.perf_counter()
    history: list[dict] = []
    if epochs > 0:
        train_classifier(model, train, epochs, batch_size=options.batch_size, lr=options.lr,
                         device=device, seed=options.seed, progress=options.progress, adversary=adversary,
                         history=history)
    model.to(device).eval()
    timing["classifier_train"] = time.perf_counter() - start

    start = time.perf_counter()
    eval_batch = max(options.batch_size, 256)
    test_correct = (predict(model, test, batch_size=eval_batch, device=device, progress=options.progress)
                    == test.labels).numpy()
    clean_accuracy = float(test_correct.mean())
    train_eval = train if len(train) <= 5_000 else train.subset(torch.arange(5_000))
    train_accuracy = accuracy(model, train_eval, batch_size=eval_batch, device=device)
    robust = None
    if adversary is not None:  # what the training bought, on test images it never saw
        probe = test.subset(torch.arange(min(len(test), ROBUST_ACCURACY_IMAGES)))
        x_probe, y_probe = probe.batch(slice(0, len(probe)))
        robust = {
            "accuracy": robust_accuracy(model, x_probe, y_probe, adversary.eps, norm=adversary.norm,
                                        batch_size=eval_batch),
            "attack": f"PGD-10 at the training radius ε = {adversary.eps:.4g} ({adversary.norm}), α = ε/4",
            "n": len(probe),
        }
        log(f"robust accuracy {robust['accuracy']:.1%} under {robust['attack']} on {len(probe)} test images")
    timing["classifier_eval"] = time.perf_counter() - start

    info = {
        "data": {
            "spec": options.data,
            "source": source,
            "n_train": len(train),
            "n_test": len(test),
            "input_shape": list(train.input_shape),
            "num_classes": train.num_classes,
            "classes": train.classes,
        },
        "classifier": {
            "architecture": architecture,
            "model_config": config,
            "byo": options.arch is not None,
            "weights": options.weights,
            "layer": layer,
            "epochs": epochs,
            "lr": options.lr if epochs else None,
            "batch_size": options.batch_size if epochs else None,
            "recipe": ("SGD momentum 0.9 (Nesterov), weight decay 5e-4, one-cycle LR, "
                       "crop+flip for images >= 32 px, bf16 autocast and channels-last on CUDA") if epochs else None,
            "adversarial_training": None if adversary is None else {
                "kind": adversary.kind, "eps": adversary.eps, "alpha": adversary.alpha,
                "steps": 1 if adversary.kind == "fast" else adversary.steps, "norm": adversary.norm,
                "described": adversary.describe(), "history": history,
                "stopped": next((h["stopped"] for h in history if "stopped" in h), None),
            },
            "robust_accuracy": robust,
            "mean": mean,
            "std": std,
            "normalisation": norm_source,
            "parameters": sum(p.numel() for p in model.parameters()),
            "clean_accuracy": clean_accuracy,
            "train_accuracy": train_accuracy,
        },
    }
    spec = InputSpec(channels, train.input_shape[1], train.input_shape[2], mean, std)
    return Prepared(train, test, test_origin, test_correct, model, layer, architecture, config, spec, device,
                    info, timing)
