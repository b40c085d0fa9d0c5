"""The artifact bundle: one directory with everything the service needs, hash-checked on load.

Layout::

    config.json     architecture, model config, classes, input spec, thresholds, output layer
    weights.pt      state_dict of the ImageClassifier (loaded with weights_only=True)
    detector.joblib the fitted UncannyValleyDetector
    report.json     (optional) the training report
    manifest.json   SHA-256 of every other file in the directory

:func:`load_bundle` verifies every hash before it deserialises anything: joblib files are pickles,
so a file that does not match the manifest is never opened for loading.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import torch

from .estimator import UncannyValleyDetector
from .features import detector_features, output_weight_norm
from .layers import feature_rows
from .models import ImageClassifier, build_classifier

__all__ = ["BatchDetection", "Bundle", "BundleError", "InputSpec", "load_bundle", "save_bundle", "verify_bundle"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "weights.pt"
DETECTOR = "detector.joblib"
REPORT = "report.json"
REQUIRED = (CONFIG, WEIGHTS, DETECTOR)


class BundleError(ValueError):
    """The bundle is missing, incomplete, tampered with or malformed; the message names the file."""


@dataclass
class InputSpec:
    """What the model takes: ``channels`` × ``height`` × ``width`` pixels in [0, 1], then normalised."""

    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        spec = cls(int(data["channels"]), int(data["height"]), int(data["width"]),
                   [float(v) for v in data["mean"]], [float(v) for v in data["std"]])
        if spec.channels not in (1, 3) or spec.height < 1 or spec.width < 1:
            raise ValueError(f"invalid input spec {data}")
        if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
            raise ValueError(f"input spec mean/std must have {spec.channels} values")
        return spec


@dataclass
class BatchDetection:
    """The answers for a batch, from one forward pass (NumPy arrays of length N, ``[N, k]`` where 2-D)."""

    labels: np.ndarray
    probabilities: np.ndarray
    adversarial: np.ndarray
    adversarial_score: np.ndarray
    sharpness: np.ndarray  # κ
    uncanny_valley: np.ndarray
    psi: np.ndarray
    features: np.ndarray  # the detector's feature rows [N, F]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Bundle:
    """A loaded bundle: the classifier with its detector, and what they were built from.

    :meth:`detect` is the one call every user of a bundle makes (the service, the evaluation): a
    batch of [0, 1] images in, predictions and the detector's verdict out.
    """

    model: ImageClassifier
    detector: UncannyValleyDetector
    classes: list[str]
    input_spec: InputSpec
    architecture: str
    model_config: dict[str, Any]
    layer: str | None
    path: Path
    sha256: str  # of manifest.json: identifies the whole bundle
    report: dict[str, Any] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)

    @cached_property
    def weight_norm(self) -> float:
        """‖W‖_F of the output layer (κ's scale)."""
        return output_weight_norm(self.model, self.layer)

    def features(self, x: torch.Tensor) -> tuple[np.ndarray, Any]:
        """The detector's feature rows for a batch of [0, 1] images, and the forward pass's analysis."""
        rows, out = self.features_with_grad(x, grad=False)
        return rows.cpu().numpy().astype(np.float64), out

    def features_with_grad(self, x: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, Any]:
        """:meth:`features` as a tensor, differentiable unless ``grad=False`` (what an adaptive attack follows)."""
        return feature_rows(self.model, x, feature_set=self.detector.feature_set, weight_norm=self.weight_norm,
                            layer=self.layer, gaussians=self.detector.layer_gaussians, grad=grad)

    def detect(self, x: torch.Tensor) -> BatchDetection:
        """Labels, probabilities, adversarial flags and scores, κ and uncanny-valley flags for a batch
        ``[N, C, H, W]`` of [0, 1] images on the model's device: one forward pass."""
        return self.detect_with_analysis(x)[0]

    def detect_with_analysis(self, x: torch.Tensor) -> tuple[BatchDetection, Any]:
        """:meth:`detect`, and the forward pass's :class:`~detector.features.Analysis` (φ included)."""
        rows, out = self.features(x)
        kappa = out.sharpness.cpu().numpy().astype(np.float64)
        verdict = self.detector.detect(rows, kappa)
        probabilities = out.probabilities.cpu().numpy()
        return BatchDetection(
            labels=probabilities.argmax(axis=1), probabilities=probabilities,
            adversarial=verdict.adversarial, adversarial_score=verdict.adversarial_score,
            sharpness=kappa, uncanny_valley=verdict.uncanny_valley,
            psi=out.psi.cpu().numpy().astype(np.float64), features=rows), out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(root: Path) -> str:
    files = {
        p.relative_to(root).as_posix(): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    text = json.dumps({"format_version": FORMAT_VERSION, "algorithm": "sha256", "files": files}, indent=2)
    (root / MANIFEST).write_text(text + "\n")
    return hashlib.sha256((text + "\n").encode()).hexdigest()


def save_bundle(
    path: str | os.PathLike,
    *,
    model: ImageClassifier,
    architecture: str,
    detector: UncannyValleyDetector,
    classes: list[str],
    input_spec: InputSpec,
    model_config: dict[str, Any] | None = None,
    layer: str | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write the bundle to ``path`` (created if needed).

    Every file already in ``path`` (plots, ``report.md``…) is covered by the manifest too, so write
    those first.  Returns the directory.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, ImageClassifier):
        raise TypeError("model must be an ImageClassifier (a network with its normalisation)")
    if not hasattr(detector, "valley_threshold_"):
        raise ValueError("the detector must be fitted and calibrated before it is saved")
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "model_config": model_config or {},
        "layer": layer,
        "classes": list(classes),
        "input_spec": input_spec.to_dict(),
        "detector": {"features": detector.feature_set, "target_fpr": detector.target_fpr,
                     "probes": detector.layer_gaussians.probes if detector.layer_gaussians is not None else []},
        "thresholds": {
            "adversarial": float(detector.operating_threshold),
            "valley": float(detector.valley_threshold_),
            "valley_quantile": float(detector.valley_quantile),
        },
    }
    (root / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, root / WEIGHTS)
    joblib.dump(detector, root / DETECTOR)
    if report is not None:
        (root / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    _write_manifest(root)
    return root


def verify_bundle(path: str | os.PathLike) -> str:
    """Check every file against the manifest; return the bundle's hash or raise :class:`BundleError`."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist")
    if not manifest_path.is_file():
        raise BundleError(f"{MANIFEST} is missing from bundle {str(root)!r}")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{MANIFEST} in {str(root)!r} is malformed: {exc}") from exc
    for name in REQUIRED:
        if name not in files:
            raise BundleError(f"{MANIFEST} in {str(root)!r} does not list required file {name}")
    for name, expected in files.items():
        file = (root / name).resolve()
        if root.resolve() not in file.parents:
            raise BundleError(f"{MANIFEST} lists {name!r}, which lies outside the bundle")
        if not file.is_file():
            raise BundleError(f"bundle file {name} is missing from {str(root)!r}")
        actual = _sha256(file)
        if actual != expected:
            raise BundleError(f"bundle file {name} does not match its SHA-256 in {MANIFEST} "
                              f"(expected {expected[:12]}…, found {actual[:12]}…): refusing to load it")
    return hashlib.sha256(raw).hexdigest()


def load_bundle(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Bundle:
    """Verify, then load a bundle written by :func:`save_bundle`."""
    root = Path(path)
    bundle_hash = verify_bundle(root)
    try:
        config = json.loads((root / CONFIG).read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
        spec = InputSpec.from_dict(config["input_spec"])
        classes = [str(c) for c in config["classes"]]
        architecture = str(config["architecture"])
        model_config = dict(config.get("model_config") or {})
        thresholds = {k: float(v) for k, v in config["thresholds"].items()}
        layer = config.get("layer")
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle file {CONFIG} is malformed: {exc}") from exc
    try:
        model = build_classifier(architecture, len(classes), spec.channels, spec.mean, spec.std, model_config)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"bundle file {CONFIG}: cannot build architecture {architecture!r}: {exc}") from exc
    try:
        state = torch.load(root / WEIGHTS, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # unpickling errors, missing or unexpected keys, shape mismatches
        raise BundleError(f"bundle file {WEIGHTS} does not fit architecture {architecture!r}: {exc}") from exc
    model.to(map_location).eval()
    try:
        detector = joblib.load(root / DETECTOR)
    except Exception as exc:
        raise BundleError(f"bundle file {DETECTOR} cannot be loaded: {exc}") from exc
    if not isinstance(detector, UncannyValleyDetector):
        raise BundleError(f"bundle file {DETECTOR} holds a {type(detector).__name__}, not an UncannyValleyDetector")
    try:
        probe = detector_features(detector.feature_set, torch.zeros(1, len(classes)), torch.ones(1), 1.0)
    except ValueError as exc:
        raise BundleError(f"bundle file {DETECTOR}: {exc}") from exc
    gaussians = detector.layer_gaussians
    n_features = probe.shape[1] + (gaussians.n_features if gaussians is not None else 0)
    if gaussians is not None:
        try:
            for name in gaussians.probes:
                model.get_submodule(name)
        except AttributeError as exc:
            raise BundleError(f"bundle file {DETECTOR} reads layers the model does not have: {exc}") from exc
    if detector.n_features_in_ != n_features:
        raise BundleError(f"bundle file {DETECTOR} expects {detector.n_features_in_} features, but its feature "
                          f"set {detector.feature_set!r} has {n_features} for {len(classes)} classes")
    report = json.loads((root / REPORT).read_text()) if (root / REPORT).is_file() else None
    return Bundle(model, detector, classes, spec, architecture, model_config, layer, root,
                  bundle_hash, report, thresholds)
