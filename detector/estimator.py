"""The adversarial-input detector: a classifier over ψ plus the uncanny-valley threshold on κ."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

__all__ = ["Detection", "UncannyValleyDetector"]


@dataclass
class Detection:
    """Per-input answers for a batch (plain arrays of length N)."""

    adversarial: np.ndarray  # bool
    adversarial_score: np.ndarray  # P(adversarial | ψ) in [0, 1]
    sharpness: np.ndarray  # κ
    uncanny_valley: np.ndarray  # bool: flagged AND κ ≤ τ


class UncannyValleyDetector(ClassifierMixin, BaseEstimator):
    """Flags adversarial inputs from ψ; calls flagged inputs at least as flat as clean data uncanny.

    ``fit(psi, is_adversarial)`` fits ``estimator`` (a decision tree by default) on ψ vectors
    labelled 0 = clean, 1 = adversarial.  Given ``kappa`` too (or later through
    :meth:`calibrate`), it sets the uncanny-valley threshold τ to the ``valley_quantile`` of κ over
    the clean inputs (the median by default), which must be inputs the classifier gets right.

    Parameters
    ----------
    estimator : sklearn classifier, optional
        Cloned before fitting. Default: ``DecisionTreeClassifier(min_samples_leaf=5)``.
    valley_quantile : float
        Quantile of clean κ that becomes τ.
    threshold : float
        Score at or above which an input is flagged adversarial.
    random_state : int
        Seed of the default tree.
    """

    def __init__(self, estimator=None, valley_quantile: float = 0.5, threshold: float = 0.5,
                 random_state: int | None = 0):
        self.estimator = estimator
        self.valley_quantile = valley_quantile
        self.threshold = threshold
        self.random_state = random_state

    def fit(self, psi, is_adversarial, kappa=None):
        X, y = check_X_y(psi, is_adversarial, dtype=np.float64)
        y = y.astype(np.int64)
        if set(np.unique(y)) != {0, 1}:
            raise ValueError("is_adversarial must contain both clean (0) and adversarial (1) inputs")
        if not 0.0 <= self.valley_quantile <= 1.0:
            raise ValueError(f"valley_quantile must be in [0, 1], got {self.valley_quantile}")
        self.estimator_ = (
            clone(self.estimator)
            if self.estimator is not None
            else DecisionTreeClassifier(min_samples_leaf=5, random_state=self.random_state)
        )
        self.estimator_.fit(X, y)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        if kappa is not None:
            kappa = np.asarray(kappa, dtype=np.float64)
            if kappa.shape != (X.shape[0],):
                raise ValueError(f"kappa must have one value per input ({X.shape[0]}), got {kappa.shape}")
            self.calibrate(kappa[y == 0])
        return self

    def calibrate(self, kappa_clean):
        """Set τ from κ of clean, correctly classified calibration inputs."""
        kappa_clean = np.asarray(kappa_clean, dtype=np.float64).ravel()
        if kappa_clean.size == 0 or not np.all(np.isfinite(kappa_clean)):
            raise ValueError("calibration needs at least one finite κ of a clean input")
        self.valley_threshold_ = float(np.quantile(kappa_clean, self.valley_quantile))
        return self

    def _check_psi(self, psi) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        if (isinstance(psi, np.ndarray) and psi.ndim == 2 and psi.dtype.kind == "f" and psi.shape[0] > 0
                and np.isfinite(psi).all()):
            # Fast path (every batch the service scores): a non-empty, finite 2-D float array needs
            # none of check_array's conversions, which cost ~0.1 ms per call, more than the tree.
            X = psi.astype(np.float64, copy=False)
        else:
            X = check_array(psi, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"ψ has {X.shape[1]} features, the detector was fitted on {self.n_features_in_}")
        return X

    def predict_proba(self, psi) -> np.ndarray:
        """``[N, 2]``: P(clean), P(adversarial)."""
        X = self._check_psi(psi)
        if type(self.estimator_) is DecisionTreeClassifier and self.estimator_.n_outputs_ == 1:
            # X is already checked (2-D, finite, n_features_in_ wide); the tree's own check would
            # only repeat that and cast to float32, which is done here: same answers, ~0.1 ms less.
            proba = self.estimator_.predict_proba(np.ascontiguousarray(X, dtype=np.float32), check_input=False)
        else:
            proba = self.estimator_.predict_proba(X)
        # A fitted estimator always saw both classes (fit checks), so columns are [0, 1].
        return proba

    def adversarial_score(self, psi) -> np.ndarray:
        return self.predict_proba(psi)[:, 1]

    def predict(self, psi) -> np.ndarray:
        """1 for inputs flagged adversarial, 0 otherwise."""
        return (self.adversarial_score(psi) >= self.threshold).astype(np.int64)

    def detect(self, psi, kappa) -> Detection:
        """Adversarial flag, score, κ and uncanny-valley flag for a batch."""
        if not hasattr(self, "valley_threshold_"):
            raise ValueError("the uncanny-valley threshold is not calibrated: fit with kappa=… or call calibrate()")
        score = self.adversarial_score(psi)
        kappa = np.asarray(kappa, dtype=np.float64).ravel()
        if kappa.shape != score.shape:
            raise ValueError(f"kappa has {kappa.size} values for {score.size} inputs")
        flagged = score >= self.threshold
        return Detection(flagged, score, kappa, flagged & (kappa <= self.valley_threshold_))
