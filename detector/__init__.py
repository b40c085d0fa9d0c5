"""Adversarial-input detection from the loss curvature of the last layer.

One forward pass gives the softmax ŷ and the penultimate features φ; from them ψ_j = ŷ_j(1−ŷ_j)‖φ‖²
(per-class trace of the loss Hessian w.r.t. the last layer) and the relative sharpness
κ = ‖W‖_F Σ_j ψ_j.  A decision tree on ψ flags adversarial inputs; a flagged input at least as flat
as typical clean data sits in the "uncanny valley".
"""

from .attacks import PGDResult, fgsm, pgd
from .bundle import (
    BatchDetection,
    Bundle,
    BundleError,
    InputSpec,
    load_bundle,
    save_bundle,
    update_bundle,
    verify_bundle,
)
from .datasets import DatasetNotFoundError, ImageDataset, load_dataset
from .estimator import Detection, UncannyValleyDetector
from .features import (
    Analysis,
    analyze,
    find_last_linear,
    forward_features,
    psi,
    relative_sharpness,
    sharpness_from_psi,
)
from .models import MODELS, ImageClassifier, build_classifier

__version__ = "0.1.0"

__all__ = [
    "MODELS", "Analysis", "BatchDetection", "Bundle", "BundleError", "DatasetNotFoundError", "Detection",
    "ImageClassifier", "ImageDataset", "InputSpec", "PGDResult", "UncannyValleyDetector",
    "analyze", "build_classifier", "find_last_linear", "forward_features", "load_bundle",
    "fgsm", "load_dataset", "pgd", "psi", "relative_sharpness", "save_bundle", "sharpness_from_psi",
    "update_bundle", "verify_bundle",
]
