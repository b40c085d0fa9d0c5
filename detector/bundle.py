"""The artifact bundle: one directory with everything the service needs, hash-checked on load.

Layout::

    config.json     architecture, model config, classes, input spec, thresholds, output layer
    weights.pt      state_dict of the ImageClassifier (loaded with weights_only=True)
    detector.skops  the fitted UncannyValleyDetector (skops.io: no pickle)
    report.json     (optional) the training report
    manifest.json   SHA-256 of every other file in the directory

Nothing in a bundle is unpickled: the weights load with ``weights_only=True`` and the detector with
skops, which builds only the types in :data:`TRUSTED_TYPES` (besides numpy's and scikit-learn's
plain estimators) and runs no code from the file.  :func:`load_bundle` refuses files the manifest
does not list, hashes each file it reads and deserialises those very bytes, and can be pinned to one
bundle hash.  A bundle is untrusted data in size as well: archives must be stored uncompressed,
weights must hold their own numbers and bound the network the config builds, and the detector's
trees may only point to nodes and features they have, so that a small file can neither exhaust
memory nor crash the process later.  Bundles of format 1 kept the detector as a pickle
(``detector.joblib``); they are refused with the command that converts them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import hmac
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import skops.io as skops_io
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from .estimator import UncannyValleyDetector, plain_boosting
from .features import detector_features, find_last_linear, output_weight_norm
from .layers import feature_rows, forward_probed, gram_layers
from .models import MODELS, ImageClassifier, classifier_for_weights

__all__ = [
    "BatchDetection", "Bundle", "BundleError", "InputSpec", "TRUSTED_TYPES", "bundle_holding",
    "convert_pickled_bundle", "load_bundle", "save_bundle", "update_bundle", "verify_bundle",
]

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "weights.pt"
DETECTOR = "detector.skops"
PICKLED_DETECTOR = "detector.joblib"  # format 1
REPORT = "report.json"
REQUIRED = (CONFIG, WEIGHTS, DETECTOR)

#: What skops may build from ``detector.skops`` beyond its defaults: the detector, its layer
#: statistics, and the fitted trees of scikit-learn's tree and histogram-boosting estimators.
TRUSTED_TYPES = (
    "detector.estimator.UncannyValleyDetector",
    "detector.layers.LayerGaussians",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    """The bundle is missing, incomplete, tampered with or malformed; the message names the file."""


#: The largest input side a bundle may declare: its model's input is allocated for whole batches at
#: warm-up, so a bundle declaring 100,000 × 100,000 would exhaust memory before serving anything.
MAX_INPUT_SIDE = 1024


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
        if max(spec.height, spec.width) > MAX_INPUT_SIDE:
            raise ValueError(f"input spec of {spec.height}×{spec.width} pixels: at most {MAX_INPUT_SIDE} on a side")
        if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
            raise ValueError(f"input spec mean/std must have {spec.channels} values")
        if not (np.isfinite(spec.mean).all() and np.isfinite(spec.std).all() and min(spec.std) > 0):
            raise ValueError(f"input spec mean/std must be finite numbers, std above 0: {spec.mean}, {spec.std}")
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

    def check_images(self, x: torch.Tensor) -> None:
        """Refuse what is not a batch of the images this bundle was fitted on: ``[N, C, H, W]`` floating-point
        pixels in [0, 1], with the input spec's channels and size.  Anything else would be scored, and the
        score would mean nothing (the detector's statistics are those of such images)."""
        spec = self.input_spec
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a batch of images [N, C, H, W], got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point pixels in [0, 1], got {x.dtype}")
        if tuple(x.shape[1:]) != (spec.channels, spec.height, spec.width):
            raise ValueError(f"expected images of {spec.channels}×{spec.height}×{spec.width} (the bundle's input "
                             f"spec), got {'×'.join(map(str, x.shape[1:]))}")
        if x.numel():
            low, high = torch.aminmax(x.detach())
            if not (low >= 0 and high <= 1):  # NaN fails both
                raise ValueError(f"expected pixels in [0, 1], got values in [{float(low):g}, {float(high):g}]")

    def features(self, x: torch.Tensor) -> tuple[np.ndarray, Any]:
        """The detector's feature rows for a batch of [0, 1] images, and the forward pass's analysis."""
        self.check_images(x)
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
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
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
    gaussians = detector.layer_gaussians
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "model_config": model_config or {},
        "layer": layer,
        "classes": list(classes),
        "input_spec": input_spec.to_dict(),
        "detector": {"features": detector.feature_set, "target_fpr": detector.target_fpr,
                     "probes": list(gaussians.probes) if gaussians is not None else [],
                     "gram_probes": list(gaussians.gram_probes) if gaussians is not None else [],
                     "rectified": bool(gaussians is not None and gaussians.rectified)},
        "thresholds": {
            "adversarial": float(detector.operating_threshold),
            "valley": float(detector.valley_threshold_),
            "valley_quantile": float(detector.valley_quantile),
        },
    }
    (root / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, root / WEIGHTS)
    (root / DETECTOR).write_bytes(skops_io.dumps(detector))
    if report is not None:
        (root / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    _write_manifest(root)
    return root


def update_bundle(path: str | os.PathLike, write: Callable[[Path], None], expected_sha256: str | None = None) -> str:
    """Add or replace a bundle's records (reports, evaluations, plots), never what makes its verdicts.

    ``path`` is resolved first (a link to a bundle updates the bundle it points to).  Under a lock
    beside the bundle, so that two updates never interleave, the bundle is verified (and refused
    unless its hash is ``expected_sha256``, when given) and copied; ``write`` gets the copy to write
    into.  The copy, with a new manifest and verified again, then takes the bundle's place: in one
    atomic exchange where the system has one (Linux), else by two renames.  A failure leaves the
    bundle as it was.  Refused if ``write`` changed the config, the weights or the detector.  Returns
    the new bundle hash: the bundle is another one now, and pins of the old hash no longer match it.
    """
    root = Path(path).resolve()
    with _update_lock(root):
        bundle_hash = verify_bundle(root, expected_sha256)
        files, _, _ = _read_manifest(root)

        def edit(stage: Path) -> str:
            if verify_bundle(stage) != bundle_hash:
                raise BundleError(f"bundle {str(root)!r} changed while it was copied; try again")
            write(stage)
            for name in REQUIRED:
                if not (stage / name).is_file() or _sha256(stage / name) != files[name]:
                    raise BundleError(f"updating bundle {str(root)!r} may add records, not change {name}")
            digest = _write_manifest(stage)
            try:
                verify_bundle(stage)
            except BundleError as exc:
                raise BundleError(f"the update would leave bundle {str(root)!r} unloadable: {exc}") from exc
            return digest

        return _replace_with_edited_copy(root, edit)


def _replace_with_edited_copy(root: Path, edit: Callable[[Path], str]) -> str:
    """Copy ``root`` beside it, let ``edit`` change the copy (returning its new hash), then swap the copy
    into ``root``'s place (:func:`_swap`); whatever fails, ``root`` is left as it was and the copy goes.
    Call it under :func:`_update_lock`."""
    stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.update-", dir=root.parent))
    try:
        shutil.copytree(root, stage, dirs_exist_ok=True)  # links become files: writes stay in the copy
        digest = edit(stage)
        _swap(stage, root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the failed copy, or after the swap the old bundle
    return digest


@contextlib.contextmanager
def _update_lock(root: Path):
    """An exclusive lock on ``.NAME.lock`` beside the bundle, held while it is updated (the file
    stays: removing it could let a waiting update and a new one in at once).  Copies left by an
    update that was killed are removed under it: no update can be running then."""
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist")
    with open(root.parent / f".{root.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for leftover in root.parent.glob(f".{root.name}.update-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _swap(new: Path, old: Path) -> None:
    """Put directory ``new`` in ``old``'s place, leaving the old contents at ``new``: one atomic
    ``renameat2(RENAME_EXCHANGE)`` where available, so that the bundle is never missing from its path."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None:
        if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(old))
    aside = new.with_name(new.name + ".old")
    old.rename(aside)
    try:
        new.rename(old)
    except BaseException:
        aside.rename(old)
        raise
    aside.rename(new)


def bundle_holding(path: str | os.PathLike) -> Path | None:
    """The bundle folder that is ``path`` or holds it (a folder with a well-formed bundle manifest), or
    None: a file written there would be one the manifest does not list, and the bundle would not load."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        try:
            _read_manifest(folder)
        except BundleError:
            continue
        return folder
    return None


def _read_manifest(root: Path) -> tuple[dict[str, str], str, int]:
    """The manifest's file hashes, the bundle hash (SHA-256 of manifest.json) and the format version
    it records, read from one read of the file."""
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist")
    try:
        if not manifest_path.is_file():
            raise BundleError(f"{MANIFEST} is missing from bundle {str(root)!r}")
        if root.resolve() not in manifest_path.resolve().parents:
            raise BundleError(f"{MANIFEST} in {str(root)!r} is a link to a file outside the bundle")
        _check_size(MANIFEST, manifest_path)
        raw = manifest_path.read_bytes()
    except (OSError, RuntimeError) as exc:  # unreadable, a link loop
        raise BundleError(f"{MANIFEST} in {str(root)!r} cannot be read: {type(exc).__name__}: {exc}") from exc
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError("files is not a mapping of names to hashes")
        version = manifest.get("format_version", 1)
        if type(version) is not int or version < 1:
            raise ValueError(f"format_version {version!r} is not a whole number from 1")
        if manifest.get("algorithm", "sha256") != "sha256":
            raise ValueError(f"algorithm {manifest.get('algorithm')!r}: only sha256 is read")
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise BundleError(f"{MANIFEST} in {str(root)!r} is malformed: {type(exc).__name__}: {exc}") from exc
    if version > FORMAT_VERSION:
        raise BundleError(f"bundle {str(root)!r} is format {version}, written by a newer version of this package "
                          f"(this one reads formats up to {FORMAT_VERSION}): upgrade the package to load it")
    for name, digest in files.items():
        if not _SHA256.match(digest.lower()):
            raise BundleError(f"{MANIFEST} in {str(root)!r} gives {name!r} a hash that is not 64 hex digits")
        # One name per file: "x/../weights.pt" would have the same file hashed (and loaded) under many.
        if (len(name) > 255 or "\x00" in name or "\\" in name or name.startswith("/")
                or posixpath.normpath(name) != name or ".." in name.split("/")):
            raise BundleError(f"{MANIFEST} in {str(root)!r} lists {name[:80]!r}, which is not a plain path in the "
                              f"bundle (no '..', '.', '//', leading '/' or '\\'): it could lie outside it or name "
                              f"one file twice")
    return files, hashlib.sha256(raw).hexdigest(), version


def _check_pin(bundle_hash: str, expected_sha256: str | None) -> None:
    if expected_sha256 is None:
        return
    expected = expected_sha256.strip().lower()
    if not _SHA256.match(expected):
        raise BundleError(f"the pinned bundle hash must be 64 hex digits, got {expected_sha256!r}")
    if not hmac.compare_digest(bundle_hash, expected):
        raise BundleError(f"the bundle's hash {bundle_hash} is not the pinned one {expected}: refusing to load it")


def verify_bundle(path: str | os.PathLike, expected_sha256: str | None = None) -> str:
    """Check every file against the manifest, refuse files it does not list, and return the bundle's
    hash (SHA-256 of manifest.json); with ``expected_sha256``, refuse any other bundle.  Raises
    :class:`BundleError`."""
    root = Path(path)
    files, bundle_hash, version = _read_manifest(root)
    _check_pin(bundle_hash, expected_sha256)
    if version < FORMAT_VERSION and PICKLED_DETECTOR in files:
        raise BundleError(
            f"bundle {str(root)!r} is format {version}: it keeps its detector as a pickle ({PICKLED_DETECTOR}), "
            f"which runs code when loaded, so it is not loaded. If you trust where it came from, convert it "
            f"once with: detector-bundle convert {str(root)!r} --trust-pickle")
    for name in REQUIRED:
        if name not in files:
            raise BundleError(f"{MANIFEST} in {str(root)!r} does not list required file {name}")
    resolved = root.resolve()
    seen: dict[Path, str] = {}
    try:
        for name, expected in files.items():
            file = (root / name).resolve()
            if resolved not in file.parents:
                raise BundleError(f"{MANIFEST} lists {name!r}, which lies outside the bundle")
            if not file.is_file():
                raise BundleError(f"bundle file {name} is missing from {str(root)!r}")
            if file in seen:
                raise BundleError(f"{MANIFEST} lists {seen[file]!r} and {name!r}, which are the same file")
            seen[file] = name
            _check_size(name, file)
            _check_hash(name, _sha256(file), expected)
        _refuse_unlisted(root, files)
    except (OSError, RuntimeError, RecursionError) as exc:  # unreadable, a link loop, endless nesting
        raise BundleError(f"bundle {str(root)!r} cannot be read: {type(exc).__name__}: {exc}") from exc
    return bundle_hash


#: The most bytes each file may hold: each is hashed, and all but the weights and the detector read
#: whole, so a file of a sparse terabyte would cost as much time (and memory) as it claims.
MAX_FILE_BYTES = {MANIFEST: 1 << 20, CONFIG: 1 << 20, REPORT: 64 << 20, DETECTOR: 256 << 20, WEIGHTS: 16 << 30}
MAX_OTHER_FILE_BYTES = 256 << 20  # figures and other records


def _check_size(name: str, path: Path) -> None:
    size, limit = path.stat().st_size, MAX_FILE_BYTES.get(name, MAX_OTHER_FILE_BYTES)
    if size > limit:
        raise BundleError(f"bundle file {name} holds {size:,} bytes, more than the {limit:,} such a file may")


def _refuse_unlisted(root: Path, files: dict[str, str]) -> None:
    unlisted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                      if (p.is_file() or p.is_symlink()) and p.relative_to(root).as_posix() != MANIFEST
                      and p.relative_to(root).as_posix() not in files)
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        raise BundleError(f"bundle {str(root)!r} holds files {MANIFEST} does not list ({shown}): a bundle holds "
                          f"only what it was saved with; remove them")


def _check_hash(name: str, actual: str, expected: str) -> None:
    if not hmac.compare_digest(actual, expected.lower()):
        raise BundleError(f"bundle file {name} does not match its SHA-256 in {MANIFEST} "
                          f"(expected {expected[:12]}…, found {actual[:12]}…): refusing to load it")


def _read_checked(root: Path, name: str, files: dict[str, str]) -> bytes:
    """The bytes of ``name``, checked against the manifest: what is deserialised is what was hashed."""
    data = (root / name).read_bytes()
    _check_hash(name, hashlib.sha256(data).hexdigest(), files[name])
    return data


#: The pickled index of a weights file (its keys, shapes and dtypes) is read by a pure-Python
#: unpickler, about a second per megabyte; a network's index takes kilobytes (a DenseNet-121's, 100 KB).
MAX_WEIGHTS_INDEX_BYTES = 4 << 20


def _check_archive(name: str, data: bytes, max_index_bytes: int | None = None) -> zipfile.ZipFile:
    """``data`` as a zip archive whose members are stored uncompressed, as ``torch.save`` and skops
    write them: a compressed member could inflate a small file into gigabytes when it is read."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
        # Readers find the central directory differently: Python where the end record sits, less the
        # directory's size; torch's by the record's offset field.  Both must find the same one, or a
        # directory Python checks can hide the one torch reads (zipfile's own end-record parser).
        end = zipfile._EndRecData(io.BytesIO(data))
        gap = end[zipfile._ECD_LOCATION] - end[zipfile._ECD_SIZE] - end[zipfile._ECD_OFFSET]
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            gap -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    except (zipfile.BadZipFile, ValueError, OSError, TypeError) as exc:
        raise BundleError(f"bundle file {name} is not a zip archive: {exc}") from exc
    if gap != 0:
        raise BundleError(f"bundle file {name} has a central directory away from where its end record says "
                          f"({gap:+,} bytes): two readers would see two archives")
    total = 0
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED or member.file_size != member.compress_size:
            raise BundleError(f"bundle file {name} has a compressed member ({member.filename[:80]!r}); bundles are "
                              f"written uncompressed")
        if max_index_bytes is not None and member.filename.endswith(".pkl") and member.file_size > max_index_bytes:
            raise BundleError(f"bundle file {name} has an index of {member.file_size:,} bytes (at most "
                              f"{max_index_bytes:,}): no network has that many weights")
        total += member.file_size
    if total > len(data):
        raise BundleError(f"bundle file {name} declares {total:,} bytes in a file of {len(data):,}")
    return archive


def _check_tensors(state: Any, file_bytes: int) -> None:
    """Every weight is a plain tensor holding its own numbers: the network built for the weights is
    bounded by their count, which a view that repeats one number (stride 0), a meta or a sparse tensor
    would inflate without the file holding them."""
    if not isinstance(state, dict):
        raise BundleError(f"bundle file {WEIGHTS} holds a {type(state).__name__}, not a state_dict")
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise BundleError(f"bundle file {WEIGHTS} holds an entry {str(key)[:80]!r} that is not a named tensor")
        if (tensor.layout != torch.strided or tensor.is_meta
                or tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes()):
            raise BundleError(f"bundle file {WEIGHTS}: {key[:80]!r} is not a plain tensor holding its "
                              f"{tensor.numel():,} numbers")
    if sum(t.numel() * t.element_size() for t in state.values()) > 2 * file_bytes:  # views may share storage
        raise BundleError(f"bundle file {WEIGHTS} holds more numbers than its {file_bytes:,} bytes")


def _check_detector(detector: UncannyValleyDetector, model: torch.nn.Module, n_classes: int, spec: InputSpec,
                    layer: str | None) -> None:
    """The detector reads as many features as the model and its feature set give, from layers the
    model has, with statistics of those layers' shapes and a classifier of the kinds detectors are
    fitted with, whose arrays have the shapes its prediction assumes."""
    try:
        probe = detector_features(detector.feature_set, torch.zeros(1, n_classes), torch.ones(1), 1.0)
    except ValueError as exc:
        raise BundleError(f"bundle file {DETECTOR}: {exc}") from exc
    gaussians = detector.layer_gaussians
    n_features = probe.shape[1] + (gaussians.n_features if gaussians is not None else 0)
    if gaussians is not None:
        probes, gram_probes = list(gaussians.probes), list(gaussians.gram_probes)
        try:
            for name in [*probes, *gram_probes]:
                model.get_submodule(name)
        except AttributeError as exc:
            raise BundleError(f"bundle file {DETECTOR} reads layers the model does not have: {exc}") from exc
        if len(set(probes)) != len(probes):
            raise BundleError(f"bundle file {DETECTOR} probes a layer more than once: {probes}")
        # A Gram matrix costs C² per image: only the layers gram_layers picks, whose width it bounds.
        if gram_probes and gram_probes != (picked := gram_layers(model, probes)):
            raise BundleError(f"bundle file {DETECTOR} reads the Gram matrices of {gram_probes}; "
                              f"detectors read them only of {picked}")
        _check_statistics(gaussians, model, n_classes, spec, layer)
    if not isinstance(detector.n_features_in_, (int, np.integer)) or detector.n_features_in_ != n_features:
        raise BundleError(f"bundle file {DETECTOR} expects {detector.n_features_in_} features, but its feature "
                          f"set {detector.feature_set!r} has {n_features} for {n_classes} classes")
    # τ is a quantile of clean κ: finite.  The flagging threshold may be -inf (flag every input).
    for name, finite in (("threshold_", False), ("valley_threshold_", True)):
        value = getattr(detector, name, 0.0)
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or np.isnan(value)
                or (finite and np.isinf(value))):
            raise BundleError(f"bundle file {DETECTOR}: {name} is {value!r}, not a {'finite ' if finite else ''}number")
    _check_estimator(detector.estimator_, n_features)


def _check_statistics(gaussians, model: torch.nn.Module, n_classes: int, spec: InputSpec, layer: str | None) -> None:
    """One mean per class and one precision per probed layer and φ, of the widths one forward pass of
    the model gives: scoring allocates by these shapes."""
    with torch.inference_mode():
        device = next(model.parameters()).device
        _, phi, acts = forward_probed(model, torch.zeros(1, spec.channels, spec.height, spec.width, device=device),
                                      gaussians.probes, layer, gaussians.gram_probes, gaussians.rectified)
    widths = [a.shape[1] for a in [*acts, phi]]
    means, precisions = list(gaussians.means_), list(gaussians.precisions_)
    if len(means) != len(widths) or len(precisions) != len(widths):
        raise BundleError(f"bundle file {DETECTOR}: layer statistics for {len(means)} layers, the detector probes "
                          f"{len(widths)}")
    # skops stores an array shared by several entries once: bound what scoring will hold, not the file.
    if sum(w * w for w in widths) > MAX_PRECISION_NUMBERS:
        raise BundleError(f"bundle file {DETECTOR}: layer statistics of widths {widths} hold more than "
                          f"{MAX_PRECISION_NUMBERS:,} precision entries")
    for width, mean, precision in zip(widths, means, precisions):
        _shaped("a layer's class means", mean, (n_classes, width))
        _shaped("a layer's precision", precision, (width, width))


def _shaped(what: str, array: Any, shape: tuple[int, ...], positive: bool = False) -> None:
    a = np.asarray(array)
    if a.shape != shape or a.dtype.kind not in "fiu" or not np.isfinite(a).all() or (positive and not (a > 0).all()):
        raise BundleError(f"bundle file {DETECTOR}: {what} must be finite numbers of shape {shape}, "
                          f"not {a.dtype} of shape {a.shape}")


#: The classifiers detectors are fitted with (:data:`detector.estimator.ESTIMATORS`), as step types.
#: skops would rebuild any scikit-learn estimator, and scikit-learn's compiled prediction trusts the
#: arrays it is given (a forest's or a support-vector machine's bad indices crash the process).
_ESTIMATOR_KINDS = ([DecisionTreeClassifier], [HistGradientBoostingClassifier], [LogisticRegression],
                    [StandardScaler, LogisticRegression])


def _check_estimator(estimator: Any, n_features: int) -> None:
    """A classifier of :data:`_ESTIMATOR_KINDS` for ``n_features`` columns and two classes, each of
    its arrays of the shape its prediction assumes."""
    steps = [step for _, step in estimator.steps] if type(estimator) is Pipeline else [estimator]
    if [type(step) for step in steps] not in _ESTIMATOR_KINDS:
        raise BundleError(f"bundle file {DETECTOR} holds a {' + '.join(type(s).__name__ for s in steps)} as its "
                          f"classifier; detectors use {', '.join(' + '.join(k.__name__ for k in kind) for kind in _ESTIMATOR_KINDS)}")
    for step in steps:
        if getattr(step, "n_features_in_", n_features) != n_features:
            raise BundleError(f"bundle file {DETECTOR}: its {type(step).__name__} reads {step.n_features_in_} "
                              f"features, not {n_features}")
        if isinstance(step, StandardScaler):
            for name in ("mean_", "scale_"):
                if getattr(step, name, None) is not None:
                    _shaped(f"the scaler's {name}", getattr(step, name), (n_features,), positive=name == "scale_")
        elif isinstance(step, LogisticRegression):
            _shaped("the logistic regression's coef_", step.coef_, (1, n_features))
            _shaped("the logistic regression's intercept_", step.intercept_, (1,))
            _shaped("the logistic regression's classes_", step.classes_, (2,))
        elif isinstance(step, DecisionTreeClassifier):
            _shaped("the tree's classes_", step.classes_, (2,))
            if step.n_outputs_ != 1:
                raise BundleError(f"bundle file {DETECTOR}: its tree has {step.n_outputs_} outputs, not 1")
        else:
            if (getattr(step, "_preprocessor", None) is not None or not plain_boosting(step)
                    or type(step._loss).__name__ != "HalfBinomialLoss"):
                raise BundleError(f"bundle file {DETECTOR}: its boosted trees are not a plain binary classifier on "
                                  f"numeric features")
            _shaped("the boosted trees' baseline", step._baseline_prediction, (1, 1))
            _shaped("the boosted trees' classes_", step.classes_, (2,))
    _check_trees(steps[-1], n_features)


def _check_trees(model: Any, n_features: int) -> None:
    """Decision and boosted trees whose nodes point only forward, to nodes they have, and split on
    features the rows have: scikit-learn's compiled prediction trusts these indices (one out of range
    reads outside memory and can crash the process; a node that is its own child never ends)."""
    tree = getattr(model, "tree_", None)
    if tree is not None:
        left, right = np.asarray(tree.children_left), np.asarray(tree.children_right)
        leaf = (left == -1) & (right == -1)
        _check_nodes("decision tree", left, right, np.asarray(tree.feature), leaf, n_features)
        if np.asarray(tree.value).shape[0] != len(left) or tree.node_count != len(left):
            raise BundleError(f"bundle file {DETECTOR}: its decision tree's values do not match its nodes")
    for iteration in getattr(model, "_predictors", None) or []:
        for predictor in iteration:
            nodes = predictor.nodes
            leaf = nodes["is_leaf"].astype(bool)
            _check_nodes("boosted tree", nodes["left"].astype(np.int64), nodes["right"].astype(np.int64),
                         nodes["feature_idx"].astype(np.int64), leaf, n_features)
            depth = nodes["depth"].astype(np.int64)
            if depth.min() < 0 or depth.max() >= len(nodes):
                raise BundleError(f"bundle file {DETECTOR}: a boosted tree has depths beyond its nodes")


def _check_nodes(kind: str, left: np.ndarray, right: np.ndarray, feature: np.ndarray, leaf: np.ndarray,
                 n_features: int) -> None:
    n = len(left)
    index = np.arange(n)
    inner = ~leaf
    ok = n >= 1 and len(right) == len(feature) == len(leaf) == n and bool(np.all(
        (left[inner] > index[inner]) & (left[inner] < n) & (right[inner] > index[inner]) & (right[inner] < n)
        & (feature[inner] >= 0) & (feature[inner] < n_features)))
    if not ok:
        raise BundleError(f"bundle file {DETECTOR}: a {kind} has nodes that point outside it, backwards, or to "
                          f"features the detector does not read")


#: The most nodes skops' audit of a detector's schema may visit; a detector's schema has thousands.
MAX_SCHEMA_NODES = 1_000_000

#: The most precision entries a detector's layer statistics may hold in all (256 MiB in float64, as much
#: as detector.skops may take): a WRN-28-4's `gram` detector holds 4.5 million.
MAX_PRECISION_NUMBERS = 1 << 25


def _schema_nodes(node: Any, sizes: dict) -> int:
    """Nodes skops visits in a schema: a reference (``{"__id__": n}`` alone) counts as the node it
    names, so a chain of nodes that each refer twice to the one before counts 2^depth."""
    if isinstance(node, list):
        return 1 + sum(_schema_nodes(v, sizes) for v in node)
    if not isinstance(node, dict):
        return 1
    if set(node) == {"__id__"}:
        return sizes.get(str(node["__id__"]), 1)
    count = 1 + sum(_schema_nodes(v, sizes) for v in node.values())
    if "__id__" in node:
        sizes[str(node["__id__"])] = count
    return count


def _load_detector(data: bytes) -> UncannyValleyDetector:
    archive = _check_archive(DETECTOR, data)
    try:
        nodes = _schema_nodes(json.loads(archive.read("schema.json")), {})
    except (KeyError, ValueError, RecursionError, zipfile.BadZipFile) as exc:
        raise BundleError(f"bundle file {DETECTOR} has no readable schema: {type(exc).__name__}: {exc}") from exc
    if nodes > MAX_SCHEMA_NODES:
        raise BundleError(f"bundle file {DETECTOR} has a schema of {nodes:,} nodes once its references are "
                          f"followed (at most {MAX_SCHEMA_NODES:,})")
    try:
        untrusted = skops_io.get_untrusted_types(data=data)
    except Exception as exc:
        raise BundleError(f"bundle file {DETECTOR} is not a skops file: {type(exc).__name__}") from exc
    unknown = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if unknown:
        raise BundleError(f"bundle file {DETECTOR} would build types outside the trusted list: {unknown}")
    try:
        detector = skops_io.loads(data, trusted=list(TRUSTED_TYPES))
    except Exception as exc:
        raise BundleError(f"bundle file {DETECTOR} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not isinstance(detector, UncannyValleyDetector):
        raise BundleError(f"bundle file {DETECTOR} holds a {type(detector).__name__}, not an UncannyValleyDetector")
    return detector


def load_bundle(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                expected_sha256: str | None = None, trusted_architectures: Collection[str] = ()) -> Bundle:
    """Verify, then load a bundle written by :func:`save_bundle`; with ``expected_sha256`` (the
    hash :attr:`Bundle.sha256` reports), any other bundle is refused.

    A bundle of a built-in architecture (:data:`detector.models.MODELS`) loads as it is. A
    bring-your-own one names a ``package.module:callable`` that loading imports and calls with the
    bundle's keyword arguments, which is running code the bundle chooses: it loads only when that name
    is in ``trusted_architectures``.
    """
    root = Path(path)
    bundle_hash = verify_bundle(root, expected_sha256)
    files, manifest_hash, _ = _read_manifest(root)
    if manifest_hash != bundle_hash:
        raise BundleError(f"{MANIFEST} in {str(root)!r} changed while the bundle was loaded")
    try:
        config = json.loads(_read_checked(root, CONFIG, files))
        if not isinstance(config, dict):
            raise TypeError(f"it holds a {type(config).__name__}, not an object")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
        spec = InputSpec.from_dict(config["input_spec"])
        if not isinstance(config["classes"], list) or len(config["classes"]) < 2:
            raise ValueError("classes must be a list of at least two names")
        classes = [str(c) for c in config["classes"]]
        architecture = str(config["architecture"])
        model_config = dict(config.get("model_config") or {})
        thresholds = {k: float(v) for k, v in config["thresholds"].items()}
        layer = config.get("layer")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a module name, not a {type(layer).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise BundleError(f"bundle file {CONFIG} is malformed: {type(exc).__name__}: {exc}") from exc
    if architecture not in MODELS and architecture not in trusted_architectures:
        raise BundleError(
            f"bundle {str(root)!r} names the architecture {architecture!r}, a factory that loading would import "
            f"and call; it is not one of the built-in {sorted(MODELS)}. If you trust it, allow it by name: "
            f"--trust-architecture {architecture} (detector-serve, detector-evaluate, detector-scan), or "
            f"DETECTOR_TRUSTED_ARCHITECTURES={architecture} for detector-serve")
    data = _read_checked(root, WEIGHTS, files)
    _check_archive(WEIGHTS, data, max_index_bytes=MAX_WEIGHTS_INDEX_BYTES)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors
        raise BundleError(f"bundle file {WEIGHTS} cannot be read as weights: {type(exc).__name__}: {exc}") from exc
    _check_tensors(state, len(data))
    try:
        # The weights bound the network the config may build, before anything is allocated for it.
        model = classifier_for_weights(architecture, len(classes), spec.channels, spec.mean, spec.std,
                                       model_config, state)
    except Exception as exc:  # a config the factory refuses (torch raises RuntimeError for a negative
        # width), or weights that do not fit: either way the bundle's data, reported as such
        raise BundleError(f"bundle files {CONFIG} and {WEIGHTS} do not make architecture {architecture!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    model.to(map_location).eval()
    try:
        find_last_linear(model, layer)  # the output layer config.json names, before the detector reads it
    except ValueError as exc:
        raise BundleError(f"bundle file {CONFIG} names an output layer the model does not have: {exc}") from exc
    detector = _load_detector(_read_checked(root, DETECTOR, files))
    try:
        _check_detector(detector, model, len(classes), spec, layer)
    except BundleError:
        raise
    except Exception as exc:  # attributes of the wrong kind: the file's data, reported as such
        raise BundleError(f"bundle file {DETECTOR} is inconsistent: {type(exc).__name__}: {exc}") from exc
    try:
        report = json.loads(_read_checked(root, REPORT, files)) if REPORT in files else None
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"bundle file {REPORT} is malformed: {type(exc).__name__}: {exc}") from exc
    if report is not None and not isinstance(report, dict):
        raise BundleError(f"bundle file {REPORT} is malformed: a JSON {type(report).__name__}, not an object")
    if report is not None and _nesting(report) > MAX_REPORT_DEPTH:
        # /model serves parts of it: deeper than this, answering would fail on every request
        raise BundleError(f"bundle file {REPORT} is malformed: nested deeper than {MAX_REPORT_DEPTH} levels")
    return Bundle(model, detector, classes, spec, architecture, model_config, layer, root,
                  bundle_hash, report, thresholds)


MAX_REPORT_DEPTH = 32  # detector-train's reports nest 7 levels deep


def _nesting(value) -> int:
    """How deep JSON ``value`` nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def convert_pickled_bundle(path: str | os.PathLike) -> str:
    """Rewrite a format-1 bundle (detector pickled in ``detector.joblib``) as the current format
    (``detector.skops``); returns the new bundle hash.

    This unpickles ``detector.joblib`` once, which runs whatever code the pickle holds: call it only on
    a bundle whose origin you trust (its architecture's factory is trusted with it, to check that the
    converted bundle loads).  Every file is checked against the manifest first; the conversion is
    written into a copy, loaded whole, and only then takes the bundle's place (as
    :func:`update_bundle` does): a failure leaves the bundle as it was.
    """
    import joblib  # the one place a pickle is read, on the user's explicit request

    root = Path(path).resolve()
    with _update_lock(root):
        files, _, version = _read_manifest(root)
        if version >= FORMAT_VERSION or PICKLED_DETECTOR not in files:
            raise BundleError(f"bundle {str(root)!r} is format {version} with no {PICKLED_DETECTOR}: "
                              f"nothing to convert")
        for name, expected in files.items():
            file = (root / name).resolve()
            if root not in file.parents or not file.is_file():
                raise BundleError(f"{MANIFEST} lists {name!r}, which is missing or lies outside the bundle")
            _check_hash(name, _sha256(file), expected)
        _refuse_unlisted(root, files)
        try:
            detector = joblib.load(io.BytesIO(_read_checked(root, PICKLED_DETECTOR, files)))
            config = json.loads(_read_checked(root, CONFIG, files))
            architecture = str(config["architecture"])
        except Exception as exc:
            raise BundleError(f"bundle {str(root)!r} cannot be read for conversion: {exc}") from exc
        if not isinstance(detector, UncannyValleyDetector):
            raise BundleError(f"{PICKLED_DETECTOR} holds a {type(detector).__name__}, not an UncannyValleyDetector")
        data = skops_io.dumps(detector)

        def edit(stage: Path) -> str:
            (stage / DETECTOR).write_bytes(data)
            config["format_version"] = FORMAT_VERSION
            (stage / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            (stage / PICKLED_DETECTOR).unlink()
            digest = _write_manifest(stage)
            try:
                load_bundle(stage, trusted_architectures=(architecture,))
            except BundleError as exc:
                raise BundleError(f"the converted bundle would not load, so {str(root)!r} was left as it was: "
                                  f"{exc}") from exc
            return digest

        return _replace_with_edited_copy(root, edit)
