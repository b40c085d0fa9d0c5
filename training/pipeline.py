"""The training pipeline: train or load a classifier, attack it along a recorded PGD path, fit the
detector on ψ, evaluate it on held-out images, and write the bundle, the report and the plots.

:func:`run` is the whole pipeline (``detector-train``); :func:`prepare` is its first half (data and
classifier), which ``detector-trajectory`` shares.  Nothing here computes ψ, κ or PGD itself: those
come from :mod:`detector`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from detector import (
    Bundle,
    ImageClassifier,
    ImageDataset,
    InputSpec,
    UncannyValleyDetector,
    analyze,
    load_dataset,
    pgd,
    save_bundle,
)
from detector.datasets import DatasetNotFoundError
from detector.estimator import DETECTORS
from detector.evaluation import attack_suite, evaluate
from detector.metrics import wilson_interval
from detector.models import MODELS, build_network

from .classifier import accuracy, predict, train_classifier
from .fitting import (
    AttackedSet,
    DetectorSet,
    balanced_side,
    fit_detector,
    split_calibration,
    split_images,
)

__all__ = [
    "AttackSettings",
    "PipelineError",
    "Prepared",
    "TrainOptions",
    "attack_paths",
    "attack_settings",
    "load_splits",
    "prepare",
    "read_state_dict",
    "run",
    "sample_correct",
    "select_correct",
    "split_images",
]

#: Attack defaults per dataset. CIFAR-like data gets the paper's PGD-10 at 8/255; the 8×8 digits
#: need a far larger ball (8/255 moves almost nothing there: success ≈ 0% at ε = 0.05).  ε = 0.2,
#: α = 0.05 fools 98% and shows the κ rise-then-fall; ε = 0.3 fools 100% but drives more
#: adversarials deep into the flat valley, where ψ looks clean: over seeds 0–2 the tree's held-out
#: accuracy was 0.73 at ε = 0.2 against 0.67 at ε = 0.3 (docs/RESULTS.md).
PAPER_ATTACK = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10}
DIGITS_ATTACK = {"eps": 0.2, "alpha": 0.05, "steps": 10}
#: Epochs when none are given and no weights are loaded.
DEFAULT_EPOCHS = {"digits": 10}
DEFAULT_EPOCHS_OTHER = 30
#: Fewest successful adversarials each side of the split needs for a meaningful fit / evaluation.
MIN_ADVERSARIAL_PER_SIDE = 2
#: Fewest clean calibration and held-out images the attack-suite evaluation runs on.
MIN_EVALUATION_IMAGES = 20
SPLIT = "split.json"


class PipelineError(RuntimeError):
    """The pipeline cannot go on; the message says what to change."""


@dataclass
class TrainOptions:
    """Every setting of ``detector-train``; the defaults are the embedded default run.

    ``None`` means "derived": ``epochs`` (0 with ``weights``, 10 on digits, else 30), ``eps`` /
    ``alpha`` / ``steps`` (per dataset, see :func:`attack_settings`), ``width`` (4 for wrn, 32
    for cnn), ``mean`` / ``std`` (the training split's channel statistics when the classifier is
    trained here, none otherwise).
    """

    # classifier
    model: str = "cnn"
    arch: str | None = None  # bring your own: "package.module:callable"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    depth: int | None = None
    width: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    layer: str | None = None
    # data
    data: str = "digits"
    data_dir: str = "data"
    download: bool = False
    image_size: list[int] | None = None  # folder: data only; (height, width), or one value for both
    train_samples: int | None = None
    test_samples: int | None = None
    # training
    epochs: int | None = None
    lr: float = 0.1
    batch_size: int = 128
    # attack
    eps: float | None = None
    alpha: float | None = None
    steps: int | None = None
    norm: str = "linf"
    random_start: bool = False
    # detector
    detector: str = "layers"
    target_fpr: float = 0.05
    max_samples: int = 2000
    test_fraction: float = 0.3
    calibration_fraction: float = 0.3
    evaluate: str = "quick"  # the attack suite run on held-out images: none, quick or full
    evaluate_images: int = 500  # held-out images the attack suite runs on, at most
    # run
    seed: int = 0
    device: str = "auto"
    out: str = "artifacts/default"
    progress: bool = True
    command: str | None = None  # how the run was started, for the report


@dataclass
class AttackSettings:
    eps: float
    alpha: float
    steps: int
    norm: str
    random_start: bool
    defaults: str  # where the unset values came from: "paper", "digits" or "given"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attack_settings(options: TrainOptions) -> AttackSettings:
    """The attack to run: given values win; the rest come from the dataset's defaults.

    A given ε without α gets α = ε/4 (the ratio of both default sets).
    """
    if options.norm not in ("linf", "l2"):
        raise PipelineError(f"--norm must be linf or l2, got {options.norm!r}")
    if options.norm == "l2" and options.eps is None:
        raise PipelineError("--norm l2 needs --eps: the defaults are L∞ radii")
    digits = options.data.partition(":")[0] == "digits"
    base = DIGITS_ATTACK if digits else PAPER_ATTACK
    eps = base["eps"] if options.eps is None else float(options.eps)
    if options.alpha is not None:
        alpha = float(options.alpha)
    else:
        alpha = base["alpha"] if options.eps is None else eps / 4
    steps = base["steps"] if options.steps is None else int(options.steps)
    if eps <= 0 or alpha <= 0 or steps < 1:
        raise PipelineError(f"the attack needs eps > 0, alpha > 0 and steps >= 1 (got {eps}, {alpha}, {steps})")
    given = all(v is not None for v in (options.eps, options.alpha, options.steps))
    source = "given" if given else ("digits" if digits else "paper")
    return AttackSettings(eps, alpha, steps, options.norm, bool(options.random_start), source)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise PipelineError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Data


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
            hint = (f" Or put {kind}_train.npz and {kind}_test.npz in --data-dir (e.g. --data-dir "
                    f"../shared/data)." if kind in ("cifar10", "cifar100") and spec == kind else "")
            raise PipelineError(f"{exc}{hint}") from exc
        train = load_dataset(f"npz:{folder}", train=True)
        test = load_dataset(f"npz:{folder}", train=False)
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
    if kind == "folder":
        c, h, w = train.input_shape
        how = "--image-size" if size is not None else "the first training image's size; --image-size changes it"
        log(f"images: {h}×{w} pixels, {c} channel{'s' if c > 1 else ''} ({how})")
    return train, test, test_origin, source


# ---------------------------------------------------------------------------------------------
# Classifier

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
        return "wrn", {"depth": options.depth or 28, "width": options.width or 4}
    if options.depth is not None:
        raise PipelineError(f"--depth applies to wrn only, not {options.model}")
    if options.model == "cnn":
        return "cnn", {"width": options.width or 32}
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


def prepare(options: TrainOptions) -> Prepared:
    """Load the data, then build, load and/or train the classifier and measure its accuracy."""
    timing: dict[str, float] = {}
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    start = time.perf_counter()
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
    channels = train.input_shape[0]
    try:
        net = build_network(architecture, train.num_classes, channels, config)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"cannot build {architecture!r} with {config}: {exc}") from exc
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
            target.load_state_dict(state)
        except RuntimeError as exc:
            raise PipelineError(f"--weights {options.weights!r} do not fit {architecture!r}: {exc}") from exc
    layer = _resolve_layer(model, options.layer)
    _check_outputs(model, train, layer, architecture)
    timing["classifier_build"] = time.perf_counter() - start

    start = time.perf_counter()
    if epochs > 0:
        train_classifier(model, train, epochs, batch_size=options.batch_size, lr=options.lr,
                         device=device, seed=options.seed, progress=options.progress)
    model.to(device).eval()
    timing["classifier_train"] = time.perf_counter() - start

    start = time.perf_counter()
    eval_batch = max(options.batch_size, 256)
    test_correct = (predict(model, test, batch_size=eval_batch, device=device, progress=options.progress)
                    == test.labels).numpy()
    clean_accuracy = float(test_correct.mean())
    train_eval = train if len(train) <= 5_000 else train.subset(torch.arange(5_000))
    train_accuracy = accuracy(model, train_eval, batch_size=eval_batch, device=device)
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
                       "crop+flip for images >= 32 px, bf16 autocast on CUDA") if epochs else None,
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


# ---------------------------------------------------------------------------------------------
# Attack


def sample_correct(correct: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Up to ``max_samples`` indices where ``correct`` holds, drawn at random (seeded), sorted."""
    index = np.flatnonzero(correct)
    return np.sort(np.random.default_rng(seed).permutation(index)[:max_samples])


def select_correct(model: torch.nn.Module, test: ImageDataset, max_samples: int, seed: int,
                   device: torch.device, batch_size: int = 512) -> np.ndarray:
    """The test images :func:`run` attacks: up to ``max_samples`` the classifier gets right."""
    correct = (predict(model, test, batch_size, device) == test.labels).numpy()
    return sample_correct(correct, max_samples, seed)


def attack_paths(model: torch.nn.Module, data: ImageDataset, index: np.ndarray, attack: AttackSettings,
                 *, layer: str | None, device: torch.device, batch_size: int, seed: int,
                 progress: bool = True) -> AttackedSet:
    """PGD with ``record=True`` on ``data[index]`` in batches; everything comes back on the CPU."""
    model.to(device).eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "clean_psi", "clean_kappa", "psi", "sharpness", "loss", "predictions", "success", "linf", "l2",
        "logits", "phi_sq")}
    batches = range(0, len(index), batch_size)
    for b, start in enumerate(tqdm(batches, desc="PGD attack", unit="batch", disable=not progress)):
        idx = torch.as_tensor(index[start:start + batch_size])
        x, y = data.batch(idx)
        x, y = x.to(device), y.to(device)
        clean = analyze(model, x, layer)
        result = pgd(model, x, y, eps=attack.eps, alpha=attack.alpha, steps=attack.steps,
                     norm=attack.norm, random_start=attack.random_start, record=True,
                     layer=layer, seed=seed + b)
        delta = (result.x_adv - x).flatten(1)
        parts["clean_psi"].append(clean.psi.cpu().numpy())
        parts["clean_kappa"].append(clean.sharpness.cpu().numpy())
        parts["psi"].append(result.psi.float().cpu().numpy())
        parts["sharpness"].append(result.sharpness.float().cpu().numpy())
        parts["loss"].append(result.loss.float().cpu().numpy())
        parts["predictions"].append(result.predictions.cpu().numpy())
        parts["success"].append(result.success.cpu().numpy())
        parts["linf"].append(delta.abs().amax(dim=1).cpu().numpy())
        parts["l2"].append(torch.linalg.vector_norm(delta, dim=1).cpu().numpy())
        parts["logits"].append(result.logits.float().cpu().numpy())
        parts["phi_sq"].append(result.phi_sq.float().cpu().numpy())
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return AttackedSet(index=np.asarray(index), labels=data.labels[torch.as_tensor(index)].numpy(), **arrays)


# ---------------------------------------------------------------------------------------------
# Detector set, split, evaluation


def _interpolate(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """y on the ROC polyline where x = ``at`` (x, y non-decreasing from (0, 0) to (1, 1)); on a
    vertical stretch at exactly ``at`` the largest y.  A tree scores in few distinct values, so the
    curve has few vertices; points between two vertices are reached by randomising between their
    thresholds, the usual reading of TPR at a fixed FPR."""
    i = int(np.searchsorted(x, at, side="right")) - 1  # last vertex with x ≤ at
    if i >= len(x) - 1 or x[i] == at:
        return float(y[i])
    return float(y[i] + (y[i + 1] - y[i]) * (at - x[i]) / (x[i + 1] - x[i]))


def rates_at(fpr: np.ndarray, tpr: np.ndarray) -> tuple[float, float]:
    """TPR at 5% FPR and TNR at 95% TPR, read off the ROC polyline."""
    tpr_at = _interpolate(fpr, tpr, 0.05)
    # FPR as a function of TPR: the smallest FPR reaching 95% TPR, again on the polyline.
    i = int(np.searchsorted(tpr, 0.95, side="left"))  # first vertex with tpr ≥ 0.95
    if i == 0 or tpr[i] == 0.95:
        fpr_at = float(fpr[i])
    else:
        fpr_at = float(fpr[i - 1] + (fpr[i] - fpr[i - 1]) * (0.95 - tpr[i - 1]) / (tpr[i] - tpr[i - 1]))
    return tpr_at, 1.0 - fpr_at


def evaluate_detector(detector: UncannyValleyDetector, held_out: DetectorSet) -> tuple[dict[str, Any], dict]:
    """Metrics on the held-out part, and the curves the plots need."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        roc_auc_score,
        roc_curve,
    )

    y = held_out.is_adv
    score = detector.score_samples(held_out.rows)
    pred = detector.predict(held_out.rows)
    fpr, tpr, _ = roc_curve(y, score)
    tpr_at, tnr_at = rates_at(fpr, tpr)
    k_fpr, k_tpr, _ = roc_curve(y, held_out.kappa)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    metrics = {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "auroc": float(roc_auc_score(y, score)),
        "tpr_at_5_fpr": tpr_at,
        "tnr_at_95_tpr": tnr_at,
        "tpr": float(tp / max(tp + fn, 1)),
        "fpr": float(fp / max(fp + tn, 1)),
        "tpr_interval": list(wilson_interval(int(tp), int(tp + fn))),
        "fpr_interval": list(wilson_interval(int(fp), int(fp + tn))),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "n_test": int(len(y)),
        "n_test_adversarial": int(y.sum()),
        # κ alone as the score: below 0.5 means adversarials are flatter than clean inputs.
        "kappa_auroc": float(roc_auc_score(y, held_out.kappa)),
    }
    curves = {"roc": (fpr, tpr), "kappa_roc": (k_fpr, k_tpr)}
    return metrics, curves


def path_statistics(attacked: AttackedSet, rows: np.ndarray | None = None) -> dict[str, list[float]]:
    """Per-step mean and spread of κ and of the loss, and the share misclassified, over ``rows``."""
    rows = np.arange(len(attacked.index)) if rows is None else rows
    kappa, loss = attacked.sharpness[rows], attacked.loss[rows]
    flipped = attacked.predictions[rows] != attacked.labels[rows, None]
    out: dict[str, list[float]] = {"step": list(range(kappa.shape[1]))}
    for name, values in (("sharpness", kappa), ("loss", loss)):
        q = np.quantile(values, [0.1, 0.25, 0.5, 0.75, 0.9], axis=0) if len(rows) else np.zeros((5, kappa.shape[1]))
        out[f"mean_{name}"] = values.mean(axis=0).tolist() if len(rows) else []
        out[f"std_{name}"] = values.std(axis=0).tolist() if len(rows) else []
        for label, row in zip(("q10", "q25", "median", "q75", "q90"), q, strict=True):
            out[f"{label}_{name}"] = row.tolist()
    out["misclassified_fraction"] = flipped.mean(axis=0).tolist() if len(rows) else []
    return out


def trajectory_summary(stats: dict[str, list[float]]) -> dict[str, Any]:
    """Where mean κ peaks and how far it rises and falls: the uncanny valley in three numbers."""
    mean = np.asarray(stats["mean_sharpness"])
    peak = int(mean.argmax())
    return {
        "peak_step": peak,
        "rise": float(mean[peak] / mean[0]) if mean[0] > 0 else float("inf"),
        "fall": float(mean[-1] / mean[peak]) if mean[peak] > 0 else 0.0,
        "final_over_clean": float(mean[-1] / mean[0]) if mean[0] > 0 else float("inf"),
    }


# ---------------------------------------------------------------------------------------------
# Machine and writing


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    return info


def check_out_dir(out: Path) -> None:
    """``out`` must be absent, empty or an earlier bundle: it is replaced as a whole, and nothing
    else (a home directory, a project folder) may be replaced by mistake."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise PipelineError(f"--out {str(out)!r} holds other files and no bundle (no manifest.json); "
                            f"the run replaces the whole directory, so give an empty or new one")


def staging_dir(out: Path) -> Path:
    """An empty sibling of ``out`` to write into before it replaces ``out`` in one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def publish(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` to ``out``, replacing what was there (never a half-written bundle)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# ---------------------------------------------------------------------------------------------
# The pipeline


def run(options: TrainOptions) -> dict[str, Any]:
    """Train (or load) the classifier, attack, fit and evaluate the detector, write everything to
    ``options.out``; returns the report (also written as ``report.json``)."""
    from . import (
        report as reporting,  # matplotlib: only when a report is written, not on import
    )

    total_start = time.perf_counter()
    attack = attack_settings(options)
    if options.max_samples < 2:
        raise PipelineError("--max-samples must be at least 2")
    try:
        split_images(2, options.test_fraction, 0)  # validates the fraction before any work
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc
    if options.detector not in DETECTORS:
        raise PipelineError(f"--detector must be one of {sorted(DETECTORS)}, got {options.detector!r}")
    if not 0.0 <= options.target_fpr < 1.0 or not 0.0 < options.calibration_fraction < 1.0:
        raise PipelineError("--target-fpr must lie in [0, 1) and --calibration-fraction in (0, 1)")
    if options.evaluate not in ("none", "quick", "full"):
        raise PipelineError(f"--evaluate must be none, quick or full, got {options.evaluate!r}")
    check_out_dir(Path(options.out))
    prepared = prepare(options)
    model, device, timing = prepared.model, prepared.device, prepared.timing

    start = time.perf_counter()
    index = sample_correct(prepared.test_correct, options.max_samples, options.seed)
    if len(index) < 2 * MIN_ADVERSARIAL_PER_SIDE:
        raise PipelineError(f"the classifier gets only {len(index)} test images right; train it longer")
    attacked = attack_paths(model, prepared.test, index, attack, layer=prepared.layer, device=device,
                            batch_size=options.batch_size, seed=options.seed, progress=options.progress)
    timing["attack"] = time.perf_counter() - start

    start = time.perf_counter()
    fit_images, test_images = split_images(len(index), options.test_fraction, options.seed)
    fit_images, calibration_images = split_calibration(fit_images, options.calibration_fraction, options.seed)
    for name, images in (("fit", fit_images), ("held-out", test_images)):
        n_adv = int(attacked.success[images].sum())
        if n_adv < MIN_ADVERSARIAL_PER_SIDE:
            raise PipelineError(
                f"only {n_adv} successful adversarials on the {name} side "
                f"(attack success {attacked.success.mean():.1%} of {len(index)}): raise --eps/--steps "
                f"or --max-samples")
    if len(calibration_images) < 1:
        raise PipelineError("no calibration images: raise --max-samples or --calibration-fraction")
    fitted = fit_detector(options.detector, model, prepared.test, attacked, fit_images, calibration_images,
                          pgd_params={k: getattr(attack, k) for k in ("eps", "alpha", "steps", "norm", "random_start")},
                          target_fpr=options.target_fpr if options.detector != "paper" else None,
                          layer=prepared.layer, device=device, batch_size=options.batch_size, seed=options.seed,
                          reference=prepared.train)
    detector, fit_set = fitted.detector, fitted.fit_set
    held_out = balanced_side(attacked, test_images, np.random.default_rng(options.seed + 2), fitted.path_rows)
    if np.intersect1d(held_out.image, np.concatenate([fit_images, calibration_images])).size:
        raise AssertionError("held-out rows come from images the detector was fitted or calibrated on")
    timing["detector_fit"] = time.perf_counter() - start

    start = time.perf_counter()
    metrics, curves = evaluate_detector(detector, held_out)
    adv_rows = held_out.is_adv == 1
    detection = detector.detect(held_out.rows[adv_rows], held_out.kappa[adv_rows])
    clean_rows = ~adv_rows
    stats = path_statistics(attacked)
    successful_test = test_images[attacked.success[test_images]]
    detection_rate = [float(detector.predict(fitted.path_rows[successful_test, t]).mean())
                      for t in range(attack.steps + 1)]
    detection_rate_all = [float(detector.predict(fitted.path_rows[test_images, t]).mean())
                          for t in range(attack.steps + 1)]
    timing["evaluation"] = time.perf_counter() - start
    warnings = run_warnings(prepared, metrics)
    for warning in warnings:
        log(f"warning: {warning}")

    report: dict[str, Any] = {
        "version": 1,
        "command": options.command,
        "options": asdict(options),
        **prepared.info,
        "attack": {
            **attack.to_dict(),
            "n_attacked": int(len(index)),
            "attacked_from": "test split, correctly classified images only",
            "success_rate": float(attacked.success.mean()),
            "n_successful": int(attacked.success.sum()),
            "max_linf": float(attacked.linf.max()),
            "mean_l2": float(attacked.l2.mean()),
        },
        "detection": {
            **metrics,
            "detector": options.detector,
            "features": detector.feature_set,
            "estimator": repr(detector.estimator_),
            **_estimator_size(detector.estimator_),
            "threshold": float(detector.operating_threshold),
            "target_fpr": detector.target_fpr,
            "calibration_fpr": getattr(detector, "calibration_fpr_", None),
            "n_calibration": getattr(detector, "n_calibration_", None),
            "fitted_on": fitted.described,
            "n_fit": int(len(fit_set.is_adv)),
            "n_fit_adversarial": int(fit_set.is_adv.sum()),
            "n_fit_images": int(len(fit_images)),
            "n_calibration_images": int(len(calibration_images)),
            "n_test_images": int(len(test_images)),
            "split": "by image: a clean image and its adversarial are always on the same side",
        },
        "valley": {
            "threshold": float(detector.valley_threshold_),
            "quantile": float(detector.valley_quantile),
            "calibrated_on": "kappa of the clean images of the fit part",
            "fraction": float(detection.uncanny_valley.mean()),
            "fraction_flat": float((held_out.kappa[adv_rows] <= detector.valley_threshold_).mean()),
            "clean_fraction_flat": float((held_out.kappa[clean_rows] <= detector.valley_threshold_).mean()),
            "median_kappa_clean": float(np.median(held_out.kappa[clean_rows])),
            "median_kappa_adversarial": float(np.median(held_out.kappa[adv_rows])),
        },
        "trajectory": {
            **stats,
            "over": "all attacked images (successful or not)",
            **trajectory_summary(stats),
            "mean_sharpness_successful": path_statistics(attacked, np.flatnonzero(attacked.success))["mean_sharpness"],
            "detection_rate": detection_rate,
            "detection_rate_over": "held-out images whose attack succeeded",
            "detection_rate_all_attacked": detection_rate_all,
        },
        "machine": machine_info(device),
        "warnings": warnings,
    }

    origin = prepared.test_origin
    used = np.concatenate([attacked.index[fit_images], attacked.index[calibration_images]])
    evaluation = None
    pool = np.setdiff1d(np.arange(len(prepared.test)), used)
    pool = np.sort(np.random.default_rng(options.seed + 3).permutation(pool)[: options.evaluate_images])
    if options.evaluate != "none" and min(len(calibration_images), len(pool)) < MIN_EVALUATION_IMAGES:
        warnings.append(f"attack suite skipped: {len(calibration_images)} calibration and {len(pool)} held-out "
                        f"images, at least {MIN_EVALUATION_IMAGES} of each are needed (raise --max-samples "
                        f"or --test-samples)")
        log(f"warning: {warnings[-1]}")
    elif options.evaluate != "none":
        start = time.perf_counter()
        in_memory = Bundle(model.eval(), detector, prepared.train.classes, prepared.input_spec,
                           prepared.architecture, prepared.model_config, prepared.layer, Path(options.out), "")
        evaluation = evaluate(
            in_memory, prepared.test, pool, excluded=used, calibration=attacked.index[calibration_images],
            suite=attack_suite(attack.eps if attack.norm == "linf" else PAPER_ATTACK["eps"],
                               int(np.prod(prepared.test.input_shape)), options.evaluate, options.seed),
            reference=prepared.train, target_fpr=options.target_fpr, batch_size=options.batch_size,
            seed=options.seed, progress=options.progress).to_dict()
        evaluation["seen_in_fitting"] = seen_in_fitting(report)
        evaluation = _json_safe(remap_ids(evaluation, origin))
        report["evaluation"] = summarize_evaluation(evaluation)
        timing["attack_suite"] = time.perf_counter() - start

    start = time.perf_counter()
    out = Path(options.out)
    stage = staging_dir(out)
    try:
        plots = reporting.write_plots(stage, report, attacked=attacked, held_out=held_out, curves=curves)
        split = {
            "about": "positions in the test split of the images each part of the detector saw",
            "fit": origin[attacked.index[fit_images]].tolist(),
            "calibration": origin[attacked.index[calibration_images]].tolist(),
            "held_out": origin[attacked.index[test_images]].tolist(),
            # The image behind every row the report's detection metrics were computed on.
            "held_out_rows": origin[attacked.index[held_out.image]].tolist(),
        }
        if evaluation is not None:
            split["evaluated"] = evaluation["image_ids"]["evaluated"]
        dump_json(stage / SPLIT, split)
        report["files"] = {**plots, "split": SPLIT}
        if evaluation is not None:
            report["files"].update(reporting.write_evaluation(stage, evaluation, title=reporting.figure_title(report)))
        timing["report"] = time.perf_counter() - start
        timing["total"] = time.perf_counter() - total_start
        report["timing"] = {"seconds": {k: round(v, 3) for k, v in timing.items()}}
        report = _json_safe(report)
        reporting.write_markdown(stage / "report.md", report)
        save_bundle(stage, model=model.cpu(), architecture=prepared.architecture, detector=detector,
                    classes=prepared.train.classes, input_spec=prepared.input_spec,
                    model_config=prepared.model_config, layer=prepared.layer, report=report)
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    model.to(device)
    return report


def remap_ids(evaluation: dict[str, Any], origin: np.ndarray) -> dict[str, Any]:
    """Image ids of an evaluation on a subset of the test split, as positions in the whole split."""
    evaluation = dict(evaluation)
    evaluation["image_ids"] = {k: origin[np.asarray(v, dtype=np.int64)].tolist()
                               for k, v in evaluation["image_ids"].items()}
    evaluation["attacks"] = [{**a, "image_ids": origin[np.asarray(a["image_ids"], dtype=np.int64)].tolist()}
                             for a in evaluation["attacks"]]
    return evaluation


def seen_in_fitting(report: dict[str, Any]) -> list[str]:
    """The natural shifts the detector's clean fitting rows went through (from the report)."""
    clean = report.get("detection", {}).get("fitted_on", {}).get("clean", {})
    return [name for name in clean if name != "clean images"] if isinstance(clean, dict) else []


def summarize_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation without its per-row arrays: what report.json and /model carry."""
    return {
        "detector": evaluation["detector"],
        "target_fpr": evaluation["target_fpr"],
        "clean": {k: v for k, v in evaluation["clean"].items() if k != "scores_correct"},
        "attacks": [{k: v for k, v in a.items() if k not in ("image_ids", "scores")} for a in evaluation["attacks"]],
        "shifts": [{k: v for k, v in s.items() if k != "scores"} for s in evaluation["shifts"]],
        "n_evaluated": len(evaluation["image_ids"]["evaluated"]),
        "seen_in_fitting": evaluation.get("seen_in_fitting", []),
    }


def _estimator_size(estimator) -> dict[str, int]:
    if hasattr(estimator, "get_depth"):
        return {"tree_depth": int(estimator.get_depth()), "tree_leaves": int(estimator.get_n_leaves())}
    if hasattr(estimator, "n_iter_"):
        return {"boosting_iterations": int(estimator.n_iter_)}
    return {}


#: Below this many held-out adversarials (or clean images), rates swing by more than ±10 points.
SMALL_SET = 100


def run_warnings(prepared: Prepared, metrics: dict[str, Any]) -> list[str]:
    """What a user should know before trusting the figures."""
    warnings = []
    k = prepared.test.num_classes
    accuracy = prepared.info["classifier"]["clean_accuracy"]
    if accuracy < min(1.0, 2.0 / k):
        warnings.append(f"the classifier is near chance ({accuracy:.1%} clean accuracy, {k} classes): "
                        f"train it longer (--epochs) before trusting the detector")
    n_adv = metrics["n_test_adversarial"]
    if n_adv < SMALL_SET:
        low, high = metrics["tpr_interval"]
        warnings.append(f"only {n_adv} held-out adversarials: the detection rate is known to "
                        f"{low:.0%}–{high:.0%} (95%); raise --max-samples")
    return warnings


def log(message: str) -> None:
    """A line for the user while the run goes on (stderr, so that the summary stays on stdout)."""
    print(message, file=sys.stderr, flush=True)


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_json_safe(data), indent=2) + "\n")

