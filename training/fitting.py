"""Fitting the detector: which inputs it learns from, split by image, and its operating point.

Two recipes, chosen by the detector's name (:data:`detector.estimator.DETECTORS`):

- ``paper``: the talk's 50:50 set of clean ψ and the final PGD iterate's ψ, a decision tree,
  flagged at P(adversarial) ≥ 0.5;
- ``activations``, ``layers`` and ``curvature``: both phases of the path.  Adversarial rows are every
  misclassified step of the recorded PGD path (near the boundary and deep in the valley), plus one
  step of the full radius (FGSM for L∞) and a PGD at a quarter of it (:func:`fit_attacks`), each
  source weighing the same; clean rows are the clean images and
  the same images after the service's own resize path, JPEG and mild photometric changes.
  The log-domain curvature features (``layers``: and the earlier layers' class-conditional
  distances; ``activations``: and those layers' channel means too) under gradient-boosted trees
  (a logistic regression for ``activations``), flagged at a threshold set on held-out clean
  calibration images to a target false-positive rate.

The images are split before anything is fitted: fit, calibration and held-out images never share
an image, so a clean image and its adversarials always sit on the same side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from detector import ImageDataset, UncannyValleyDetector, distributed, pgd
from detector.attacks import get_attack
from detector.estimator import make_detector
from detector.evaluation import same_attack
from detector.features import detector_features, output_weight_norm
from detector.layers import LayerGaussians, feature_rows, gaussians_for
from detector.shifts import apply_shift

__all__ = [
    "CLEAN_VARIANTS", "FIT_SOURCES", "AttackedSet", "DetectorSet", "FittedDetector", "balanced_side",
    "calibration_rows", "fit_attacks", "fit_detector", "fit_sources", "seen_in_fitting", "split_calibration",
    "split_images",
]

#: Clean images are also seen through these (the service's resize path, JPEG, and milder photometric
#: changes than the evaluation's), so ordinary uploads do not fire.  The evaluation marks the shifts
#: the detector saw.
CLEAN_VARIANTS = ("upscaled ×4", "JPEG q75", "JPEG q60", "brightness ×0.9", "contrast ×0.85", "noise σ=0.01",
                  "noise σ=0.03", "JPEG q40", "noise σ=0.07")


#: The adversarial sources the detectors other than ``paper`` are fitted on (``--fit-attacks``): every
#: misclassified step of the recorded PGD path, one step of the full radius, a PGD at a quarter of it.
FIT_SOURCES = ("path", "one-step", "small")

#: The source label of the recorded path's misclassified steps.
PATH_LABEL = "pgd path (every misclassified step)"


def fit_sources(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` of :data:`FIT_SOURCES`, each once in the order given; a ValueError says which are not."""
    names = tuple(dict.fromkeys(names))
    unknown = [name for name in names if name not in FIT_SOURCES]
    if unknown or not names:
        raise ValueError(f"names some of {', '.join(FIT_SOURCES)}, got {', '.join(unknown) or 'none'}")
    return names


def fit_attacks(detector: str, pgd_params: dict, sources: Sequence[str] = FIT_SOURCES) -> dict[str, dict]:
    """The attacks whose adversarials the detector ``detector`` is fitted on, by source label:
    ``{"attack": registered attack name, "params": {...}}``.  The recorded PGD (``pgd_params``:
    ``eps``, ``alpha``, ``steps``, ``norm``, ``random_start``): ``paper`` learns its final iterate;
    the others every misclassified step of it (``path``), one step of the full radius (``one-step``)
    and a 10-step PGD at a quarter of it (``small``), in the recorded norm, those of ``sources`` in
    that order."""
    sources = fit_sources(sources)
    eps, norm = float(pgd_params["eps"]), pgd_params.get("norm", "linf")
    name = "pgd-l2" if norm == "l2" else "pgd"
    recorded = {"attack": name, "params": {"eps": eps, "alpha": float(pgd_params["alpha"]),
                                           "steps": int(pgd_params["steps"]),
                                           "random_start": bool(pgd_params.get("random_start", False))}}
    if detector == "paper":
        return {"final PGD iterate": recorded}
    one_step = ({"attack": "fgsm", "params": {"eps": eps}} if norm == "linf"
                else {"attack": "pgd-l2", "params": {"eps": eps, "alpha": eps, "steps": 1}})
    every = {"path": (PATH_LABEL, recorded),
             "one-step": ("fgsm" if norm == "linf" else "one-step L2", one_step),
             "small": ("pgd ε/4", {"attack": name, "params": {"eps": eps / 4, "alpha": eps / 16, "steps": 10}})}
    return dict(every[source] for source in FIT_SOURCES if source in sources)


def seen_in_fitting(report: dict[str, Any], attacks: Sequence[dict[str, Any]] = ()) -> list[str]:
    """What the detector saw in fitting (from the report): the natural shifts its clean rows went
    through, and the labels of those ``attacks`` (evaluation records: ``label``, ``attack``,
    ``params``) that run an attack it was fitted on, with the same parameters, on other images."""
    detection = report.get("detection", {})
    fitted = detection.get("fitted_on", {})
    clean = fitted.get("clean", {})
    seen = [name for name in clean if name != "clean images"] if isinstance(clean, dict) else []
    sources = fitted.get("attacks") or {}
    if not sources and "detector" in detection and "eps" in report.get("attack", {}):
        # Reports written before the fitted attacks were recorded: today's recipe, if its sources are
        # the ones the report counts (an older recipe's are not told apart).
        recipe = fit_attacks(detection["detector"], report["attack"])
        sources = recipe if list(recipe) == list(fitted.get("adversarial", {})) else {}
    return seen + [a["label"] for a in attacks
                   if any(same_attack(a["attack"], a["params"], s["attack"], s["params"]) for s in sources.values())]


@dataclass
class AttackedSet:
    """Clean test images the classifier gets right, their PGD paths and their clean ψ/κ."""

    index: np.ndarray  # into the test split
    labels: np.ndarray
    clean_psi: np.ndarray  # [N, k]
    clean_kappa: np.ndarray  # [N]
    psi: np.ndarray  # [N, T+1, k] along the path
    sharpness: np.ndarray  # [N, T+1]
    loss: np.ndarray  # [N, T+1]
    predictions: np.ndarray  # [N, T+1]
    success: np.ndarray  # [N] bool
    linf: np.ndarray  # [N] ‖x_adv − x‖∞
    l2: np.ndarray  # [N] ‖x_adv − x‖₂
    logits: np.ndarray  # [N, T+1, k]
    phi_sq: np.ndarray  # [N, T+1] ‖φ‖²


@dataclass
class DetectorSet:
    """Feature rows of one side of the split, clean vs adversarial, with their image positions."""

    psi: np.ndarray
    kappa: np.ndarray
    is_adv: np.ndarray
    image: np.ndarray  # position in the AttackedSet of the image each row comes from
    rows: np.ndarray | None = None  # the detector's feature rows (ψ for the paper's detector)


def split_images(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions 0..n−1 split into fit and held-out parts at the level of images, so that a clean
    image and its own adversarial always land on the same side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must lie strictly between 0 and 1, got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def split_calibration(fit_images: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit images minus a ``fraction`` kept apart (clean only) for the operating point."""
    order = np.random.default_rng(seed + 7).permutation(fit_images)
    n_cal = int(round(len(order) * fraction))
    return np.sort(order[n_cal:]), np.sort(order[:n_cal])


def _path_rows(attacked: AttackedSet, feature_set: str, weight_norm: float) -> np.ndarray:
    """Feature rows ``[N, T+1, F]`` of every iterate of every path."""
    logits = torch.from_numpy(attacked.logits)
    n, t1, k = logits.shape
    rows = detector_features(feature_set, logits.reshape(n * t1, k),
                             torch.from_numpy(attacked.phi_sq).reshape(n * t1), weight_norm)
    return rows.numpy().astype(np.float64).reshape(n, t1, -1)


def balanced_side(attacked: AttackedSet, images: np.ndarray, rng: np.random.Generator,
                  path_rows: np.ndarray | None = None) -> DetectorSet:
    """The successful adversarials among ``images`` (final iterate) and as many clean inputs, drawn
    from all of ``images`` (not only the attackable ones, so clean data is represented as it comes).
    ``path_rows`` gives the detector's feature rows; without it the rows are ψ."""
    adv = images[attacked.success[images]]
    clean = np.sort(rng.choice(images, size=len(adv), replace=False))
    psi = np.concatenate([attacked.clean_psi[clean], attacked.psi[adv, -1]])
    kappa = np.concatenate([attacked.clean_kappa[clean], attacked.sharpness[adv, -1]])
    is_adv = np.concatenate([np.zeros(len(clean), np.int64), np.ones(len(adv), np.int64)])
    rows = psi if path_rows is None else np.concatenate([path_rows[clean, 0], path_rows[adv, -1]])
    return DetectorSet(psi, kappa, is_adv, np.concatenate([clean, adv]), rows)


@dataclass
class Extractor:
    """The detector's feature rows for a batch: what :meth:`detector.Bundle.features` computes."""

    model: torch.nn.Module
    feature_set: str
    weight_norm: float
    layer: str | None
    gaussians: LayerGaussians | None = None

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Rows ``[N, F]`` (float64) and the predicted labels."""
        rows, out = feature_rows(self.model, x, feature_set=self.feature_set, weight_norm=self.weight_norm,
                                 layer=self.layer, gaussians=self.gaussians)
        return rows.cpu().numpy().astype(np.float64), out.predictions


def _batched_rows(extract: Extractor, data: ImageDataset, index: np.ndarray, transform, device: torch.device,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows of ``transform(x, y)`` for the images ``data[index]``, and whether each is misclassified
    (each rank of a torchrun computes its share)."""
    if len(index) == 0:
        return np.empty((0, 0)), np.empty(0, bool)

    def rows_of(positions: np.ndarray, _: int) -> dict[str, np.ndarray]:
        x, y = data.batch(torch.as_tensor(index[positions]))
        x, y = x.to(device), y.to(device)
        r, predicted = extract(transform(x, y))
        return {"rows": r, "wrong": (predicted != y).cpu().numpy()}

    out = distributed.map_batches(len(index), batch_size, rows_of)
    return out["rows"], out["wrong"]


def calibration_rows(extract: Extractor, data: ImageDataset, index: np.ndarray, *, device: torch.device,
                     batch_size: int, variants: Sequence[str] = CLEAN_VARIANTS) -> np.ndarray:
    """Feature rows of clean images, as they come and through each of ``variants`` (names of
    :mod:`detector.shifts`), in that order: the first ``len(index)`` rows are the images as they came,
    which :func:`fit_detector` relies on to mark them for the operating point."""
    parts = [_batched_rows(extract, data, index, lambda x, y: x, device, batch_size)[0]]
    for name in variants:
        parts.append(_batched_rows(extract, data, index, lambda x, y, n=name: apply_shift(n, x), device,
                                   batch_size)[0])
    return np.concatenate(parts)


def _rerun_path_rows(extract: Extractor, data: ImageDataset, attacked: AttackedSet, pgd_params: dict, seed: int,
                     device: torch.device, batch_size: int) -> np.ndarray:
    """Feature rows ``[N, T+1, F]`` of every iterate, from PGD run again exactly as the recorded one
    (same batches, same seeds), for features the recorded logits do not give (earlier layers)."""
    def path_rows(positions: np.ndarray, b: int) -> dict[str, np.ndarray]:
        x, y = data.batch(torch.as_tensor(attacked.index[positions]))
        x, y = x.to(device), y.to(device)
        path = pgd(extract.model, x, y, record=True, keep_iterates=True, layer=extract.layer, seed=seed + b,
                   **pgd_params)
        n, t1 = path.iterates.shape[:2]
        rows, _ = extract(path.iterates.flatten(0, 1))
        return {"rows": rows.reshape(n, t1, -1)}

    # The same batches (and so the same random starts) as attack_paths, on one process or many.
    return distributed.map_batches(len(attacked.index), batch_size, path_rows)["rows"]


@dataclass
class FittedDetector:
    detector: UncannyValleyDetector
    fit_set: DetectorSet  # the rows it was fitted on
    path_rows: np.ndarray  # [N, T+1, F]: its feature rows along every recorded path
    described: dict  # what the rows were, for the report


#: Clean training images the earlier layers' statistics are fitted on, at most.
REFERENCE_IMAGES = 5000


def fit_detector(name: str, model, data: ImageDataset, attacked: AttackedSet, fit_images: np.ndarray,
                 calibration_index: np.ndarray, *, pgd_params: dict, target_fpr: float | None, layer: str | None,
                 device: torch.device, batch_size: int, seed: int,
                 reference: ImageDataset | None = None, estimator: str | None = None,
                 clean_variants: Sequence[str] = CLEAN_VARIANTS,
                 fit_sources: Sequence[str] = FIT_SOURCES) -> FittedDetector:
    """Fit the detector ``name`` on the fit images (positions in ``attacked``), its operating point on
    the calibration images (positions in ``data``, clean only).  ``pgd_params`` are the recorded attack's (``eps``,
    ``alpha``, ``steps``, ``norm``, ``random_start``); ``reference`` (clean training images) fits the
    earlier layers' statistics of detectors that read them; the clean fit and calibration images are
    also seen through ``clean_variants`` and the adversarials come from ``fit_sources``
    (:func:`fit_attacks`; neither for the paper's detector)."""
    detector = make_detector(name, target_fpr=target_fpr, random_state=seed, estimator=estimator)
    weight_norm = output_weight_norm(model, layer)
    extract = Extractor(model, detector.features, weight_norm, layer)
    if detector.probes:
        if reference is None:
            raise ValueError(f"the {name!r} detector needs clean reference images for its layer statistics")
        pick = torch.as_tensor(np.sort(np.random.default_rng(seed).permutation(len(reference))[:REFERENCE_IMAGES]))
        x_ref, y_ref = reference.batch(pick)
        extract.gaussians = gaussians_for(detector, model, layer).fit(model, x_ref, y_ref, batch_size=batch_size)
        detector.set_layer_statistics(extract.gaussians)
        path_rows = _rerun_path_rows(extract, data, attacked, pgd_params, seed, device, batch_size)
    else:
        path_rows = _path_rows(attacked, detector.features, weight_norm)
    attacks = fit_attacks(name, pgd_params, fit_sources)
    rng = np.random.default_rng(seed + 1)
    calibration = (None if detector.target_fpr is None else
                   calibration_rows(extract, data, calibration_index, device=device,
                                    batch_size=batch_size, variants=clean_variants))
    # calibration_rows puts the images as they came first, then each variant of them.
    as_given = None if calibration is None else np.arange(len(calibration)) < len(calibration_index)
    if name == "paper":
        fit_set = balanced_side(attacked, fit_images, rng, path_rows)
        detector.fit(fit_set.rows, fit_set.is_adv, kappa=fit_set.kappa, calibration=calibration,
                     calibration_as_given=as_given)
        described = {"adversarial": {"final PGD iterate": int(fit_set.is_adv.sum())},
                     "clean": {"clean images": int((fit_set.is_adv == 0).sum())},
                     "balance": "50:50", "attacks": attacks}
        return FittedDetector(detector, fit_set, path_rows, described)

    # Both phases: every misclassified step of the path, plus one-step and small-ε attacks.
    adv_rows, sources = [], {}
    if PATH_LABEL in attacks:
        wrong = attacked.predictions[fit_images] != attacked.labels[fit_images, None]
        wrong[:, 0] = False
        adv_rows.append(path_rows[fit_images][wrong])
        sources[PATH_LABEL] = int(wrong.sum())
    index = attacked.index[fit_images]
    for label in (label for label in attacks if label != PATH_LABEL):
        fn, params = get_attack(attacks[label]["attack"]).fn, attacks[label]["params"]
        rows, misclassified = _batched_rows(extract, data, index, lambda x, y, fn=fn, p=params: fn(model, x, y, **p),
                                            device, batch_size)
        adv_rows.append(rows[misclassified])
        sources[label] = int(misclassified.sum())
    if not any(len(r) for r in adv_rows):
        raise ValueError(f"none of the fit images was misclassified by {', '.join(attacks)}: nothing adversarial to "
                         "fit the detector on")
    clean_rows = calibration_rows(extract, data, index, device=device, batch_size=batch_size, variants=clean_variants)
    adv = np.concatenate(adv_rows)
    X = np.concatenate([clean_rows, adv])
    y = np.r_[np.zeros(len(clean_rows), np.int64), np.ones(len(adv), np.int64)]
    # Clean and adversarial weigh half each (the paper's 50:50 without dropping rows), and within
    # the adversarial half every source weighs the same: the path's ~T rows per image would
    # otherwise drown the one-step and small-ε attacks.
    used = [r for r in adv_rows if len(r)]
    adv_weights = np.concatenate([np.full(len(r), 1.0 / (len(used) * len(r))) for r in used])
    weights = np.r_[np.full(len(clean_rows), 0.5 / len(clean_rows)), 0.5 * adv_weights] * len(y)
    if "random_state" in detector.estimator.get_params():
        detector.estimator.set_params(random_state=seed)
    detector.fit(X, y, calibration=calibration, sample_weight=weights, calibration_as_given=as_given)
    detector.calibrate(attacked.clean_kappa[fit_images])
    fit_set = DetectorSet(np.empty((0, 0)), np.empty(0), y, np.empty(0, np.int64), X)
    described = {"adversarial": sources, "clean": {"clean images": len(fit_images),
                                                   **{v: len(fit_images) for v in clean_variants}},
                 "balance": "sample weights: clean and adversarial half each, every adversarial source alike",
                 "attacks": attacks}
    return FittedDetector(detector, fit_set, path_rows, described)
