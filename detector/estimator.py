"""The adversarial-input detector: a classifier over per-input features, an operating point, and the
uncanny-valley threshold on κ.

The shape follows scikit-learn's outlier detectors: :meth:`~UncannyValleyDetector.score_samples`
gives the raw score, :meth:`~UncannyValleyDetector.decision_function` the score minus the fitted
threshold, and :meth:`~UncannyValleyDetector.predict` its sign.  The threshold is fitted on held-out
clean calibration inputs to a target false-positive rate, as ``LocalOutlierFactor.offset_`` is.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from .layers import EVERY_CONV
from .smoothing import soft_trees

__all__ = ["DEFAULT_DETECTOR", "DETECTORS", "ESTIMATORS", "Detection", "UncannyValleyDetector", "make_detector"]


@dataclass
class Detection:
    """Per-input answers for a batch (plain arrays of length N)."""

    adversarial: np.ndarray  # bool: score ≥ threshold
    adversarial_score: np.ndarray  # P(adversarial | features) in [0, 1]
    sharpness: np.ndarray  # κ
    uncanny_valley: np.ndarray  # bool: flagged AND κ ≤ τ


def flagging_threshold(clean_scores: np.ndarray, target_fpr: float) -> float:
    """The lowest threshold at which at most ``target_fpr`` of ``clean_scores`` score at or above it.

    Inputs are flagged when ``score >= threshold``; the threshold sits just above the clean score
    ranked ``floor(target_fpr · n) + 1`` from the top, so ties there are not flagged.
    """
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64).ravel())[::-1]
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("the operating point needs at least one finite clean score")
    allowed = int(np.floor(target_fpr * scores.size + 1e-9))
    if allowed >= scores.size:
        return float(-np.inf)
    return float(np.nextafter(scores[allowed], np.inf))


class UncannyValleyDetector(ClassifierMixin, BaseEstimator):
    """Flags adversarial inputs from per-input features; calls flagged inputs at least as flat as
    clean data uncanny.

    ``fit(X, is_adversarial)`` fits ``estimator`` on feature rows labelled 0 = clean,
    1 = adversarial.  ``features`` names the feature set the rows are (see
    :data:`detector.features.FEATURE_SETS`): the detector does not compute them, it records which
    ones it needs.  Given ``kappa`` (or later through :meth:`calibrate`) it sets the uncanny-valley
    threshold τ to the ``valley_quantile`` of κ over the clean inputs.  Given ``calibration`` (feature
    rows of held-out clean inputs) and ``target_fpr``, it sets the flagging threshold so that at most
    that share of them is flagged; otherwise the threshold is ``threshold``.  When the calibration
    rows also hold changed copies of the clean inputs (resized, recompressed, …), ``calibration_as_given``
    marks the inputs as they came, and at most ``target_fpr`` of those alone is flagged too: easy
    variants must not buy false positives on ordinary inputs.

    Parameters
    ----------
    estimator : sklearn classifier, optional
        Cloned before fitting. Default: ``DecisionTreeClassifier(min_samples_leaf=5)``.
    features : str
        Name of the feature set the rows are.
    probes : int
        Earlier layers whose class-conditional distances follow the feature set in each row (0: none;
        :data:`detector.layers.EVERY_CONV`: every convolution).
        Their statistics are fitted apart and set with :meth:`set_layer_statistics`.
    probe_means : bool
        Whether those layers' channel means follow their distances in each row.
    probe_agreement : bool
        Whether each layer's agreement gap (how much nearer another class is than the predicted one)
        follows its distance in each row.
    probe_gram : bool
        Whether the Gram matrices of the first conv and the first probed layer are read too (their
        distances, and their entries when ``probe_means``): :func:`detector.layers.gram_layers`.
    probe_rectified : bool
        Whether the probes' channel means are those of their outputs clipped at zero, max(0, ·).
    valley_quantile : float
        Quantile of clean κ that becomes τ.
    threshold : float
        Score at or above which an input is flagged, when no operating point is fitted.
    target_fpr : float or None
        Share of clean calibration inputs allowed at or above the fitted threshold.
    random_state : int
        Seed of the default estimator.

    Attributes
    ----------
    estimator_ : the fitted classifier
    threshold_ : float, the flagging threshold in use
    valley_threshold_ : float, τ
    calibration_fpr_ : float, the share of calibration inputs flagged at ``threshold_`` (when fitted on them)
    calibration_fpr_as_given_ : float or None, the same over the inputs as they came (None: not marked)
    """

    probe_means = False  # detectors saved before the parameter existed read this default
    probe_agreement = False  # the same
    probe_gram = False  # the same
    probe_rectified = False  # the same

    def __init__(self, estimator=None, features: str = "psi", probes: int = 0, probe_means: bool = False,
                 probe_agreement: bool = False, probe_gram: bool = False, probe_rectified: bool = False,
                 valley_quantile: float = 0.5,
                 threshold: float = 0.5, target_fpr: float | None = None, random_state: int | None = 0):
        self.estimator = estimator
        self.features = features
        self.probes = probes
        self.probe_means = probe_means
        self.probe_agreement = probe_agreement
        self.probe_gram = probe_gram
        self.probe_rectified = probe_rectified
        self.valley_quantile = valley_quantile
        self.threshold = threshold
        self.target_fpr = target_fpr
        self.random_state = random_state

    def fit(self, X, is_adversarial, kappa=None, calibration=None, sample_weight=None, calibration_as_given=None):
        X, y = check_X_y(X, is_adversarial, dtype=np.float64)
        y = y.astype(np.int64)
        if set(np.unique(y)) != {0, 1}:
            raise ValueError("is_adversarial must contain both clean (0) and adversarial (1) inputs")
        if not 0.0 <= self.valley_quantile <= 1.0:
            raise ValueError(f"valley_quantile must be in [0, 1], got {self.valley_quantile}")
        if self.target_fpr is not None and not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {self.target_fpr}")
        self.estimator_ = (
            clone(self.estimator)
            if self.estimator is not None
            else DecisionTreeClassifier(min_samples_leaf=5, random_state=self.random_state)
        )
        if sample_weight is None:
            self.estimator_.fit(X, y)
        elif isinstance(self.estimator_, Pipeline):  # the weights belong to its last step
            self.estimator_.fit(X, y, **{f"{self.estimator_.steps[-1][0]}__sample_weight":
                                         np.asarray(sample_weight, dtype=np.float64)})
        else:
            self.estimator_.fit(X, y, sample_weight=np.asarray(sample_weight, dtype=np.float64))
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        self.threshold_ = float(self.threshold)
        if kappa is not None:
            kappa = np.asarray(kappa, dtype=np.float64)
            if kappa.shape != (X.shape[0],):
                raise ValueError(f"kappa must have one value per input ({X.shape[0]}), got {kappa.shape}")
            self.calibrate(kappa[y == 0])
        if self.target_fpr is not None:
            if calibration is None:
                raise ValueError("target_fpr needs calibration=<feature rows of held-out clean inputs>: "
                                 "a threshold tuned on the fitting rows underestimates the false-positive rate")
            self.set_operating_point(calibration, as_given=calibration_as_given)
        return self

    def set_operating_point(self, calibration, target_fpr: float | None = None, as_given=None):
        """Fit the flagging threshold on clean calibration rows to ``target_fpr`` (default: the
        parameter): at most that share of the rows flagged and, given ``as_given`` (a boolean mask of
        the rows that are clean inputs as they came, the others their changed copies), at most that
        share of those alone."""
        target = self.target_fpr if target_fpr is None else target_fpr
        if target is None or not 0.0 <= target < 1.0:
            raise ValueError(f"the operating point needs a target_fpr in [0, 1), got {target}")
        scores = self.score_samples(calibration)
        self.threshold_ = flagging_threshold(scores, target)
        self.calibration_fpr_as_given_ = None  # a refit without the mask leaves no figure of an older one
        if as_given is not None:
            as_given = np.asarray(as_given, dtype=bool)
            if as_given.shape != scores.shape or not as_given.any():
                raise ValueError(f"as_given must mark at least one of the {scores.size} calibration rows, "
                                 f"got a mask of shape {as_given.shape} with {int(as_given.sum())} marked")
            self.threshold_ = max(self.threshold_, flagging_threshold(scores[as_given], target))
            self.calibration_fpr_as_given_ = float(np.mean(scores[as_given] >= self.threshold_))
        self.calibration_fpr_ = float(np.mean(scores >= self.threshold_))
        self.n_calibration_ = int(scores.size)
        return self

    def calibrate(self, kappa_clean):
        """Set τ from κ of clean, correctly classified calibration inputs."""
        kappa_clean = np.asarray(kappa_clean, dtype=np.float64).ravel()
        if kappa_clean.size == 0 or not np.all(np.isfinite(kappa_clean)):
            raise ValueError("calibration needs at least one finite κ of a clean input")
        self.valley_threshold_ = float(np.quantile(kappa_clean, self.valley_quantile))
        return self

    @property
    def operating_threshold(self) -> float:
        """The flagging threshold in use (``threshold_``; ``threshold`` for detectors saved before it existed)."""
        return float(getattr(self, "threshold_", self.threshold))

    @property
    def feature_set(self) -> str:
        return getattr(self, "features", "psi")

    def reads(self) -> dict:
        """What the detector reads from the forward pass, for reports: its output-layer feature set, how
        many earlier layers it probes and whether it reads their agreement gaps, channel means and Gram
        matrices too."""
        return {"features": self.feature_set, "probes": int(getattr(self, "probes", 0)),
                "probe_means": bool(self.probe_means), "probe_agreement": bool(self.probe_agreement),
                "probe_gram": bool(self.probe_gram), "probe_rectified": bool(self.probe_rectified)}

    @property
    def layer_gaussians(self):
        """The earlier layers' statistics (:class:`detector.layers.LayerGaussians`), or None."""
        return getattr(self, "layer_gaussians_", None)

    def set_layer_statistics(self, gaussians):
        """Attach the fitted earlier-layer statistics whose :meth:`~detector.layers.LayerGaussians.rows` end
        every feature row."""
        self.layer_gaussians_ = gaussians
        return self

    def _check_X(self, X) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        if (isinstance(X, np.ndarray) and X.ndim == 2 and X.dtype.kind == "f" and X.shape[0] > 0
                and np.isfinite(X).all()):
            # Fast path (every batch the service scores): a non-empty, finite 2-D float array needs
            # none of check_array's conversions, which cost ~0.1 ms per call, more than the tree.
            X = X.astype(np.float64, copy=False)
        else:
            X = check_array(X, dtype=np.float64, ensure_min_samples=0)  # an empty batch has empty answers
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"got {X.shape[1]} features, the detector was fitted on {self.n_features_in_}")
        return X

    def predict_proba(self, X) -> np.ndarray:
        """``[N, 2]``: P(clean), P(adversarial)."""
        X = self._check_X(X)
        if not len(X):
            return np.empty((0, 2))
        if type(self.estimator_) is DecisionTreeClassifier and self.estimator_.n_outputs_ == 1:
            # X is already checked (2-D, finite, n_features_in_ wide); the tree's own check would
            # only repeat that and cast to float32, which is done here: same answers, ~0.1 ms less.
            return self.estimator_.predict_proba(np.ascontiguousarray(X, dtype=np.float32), check_input=False)
        compiled = _compiled_boosting(self.estimator_)
        if compiled is not None:  # X is finite: _check_X refused anything else
            return compiled.predict_proba(X)
        parts = _linear_parts(self.estimator_)
        if parts is not None:
            return _logistic_proba(parts, X)
        # A fitted estimator always saw both classes (fit checks), so columns are [0, 1].
        return self.estimator_.predict_proba(X)

    def score_samples(self, X) -> np.ndarray:
        """The raw adversarial score P(adversarial | features), in [0, 1]."""
        return self.predict_proba(X)[:, 1]

    adversarial_score = score_samples

    def decision_function(self, X) -> np.ndarray:
        """Score minus the flagging threshold: flagged where ≥ 0."""
        return self.score_samples(X) - self.operating_threshold

    @property
    def gradient(self) -> str | None:
        """How :meth:`decision_tensor` differentiates the classifier: ``"exact"`` for a (standardised)
        logistic regression, ``"smoothed"`` for a decision tree or boosted trees (splits softened to
        sigmoids: :mod:`detector.smoothing`), None for anything else."""
        estimator = getattr(self, "estimator_", None)
        if _linear_parts(estimator) is not None:
            return "exact"
        return "smoothed" if soft_trees(estimator) is not None else None

    def decision_tensor(self, rows: torch.Tensor, temperature: torch.Tensor | float | None = None) -> torch.Tensor:
        """The classifier's logit for feature rows as a differentiable tensor: what an adaptive attacker
        descends.  Exact for a logistic regression (its sigmoid is :meth:`score_samples`); for trees,
        their output with every split softened at ``temperature`` (a scalar or one per feature, in the
        features' units), which tends to the trees' own logit as the temperature goes to 0."""
        estimator = getattr(self, "estimator_", None)
        parts = _linear_parts(estimator)
        if parts is not None:
            mean, scale, coef, intercept = (torch.as_tensor(p, dtype=rows.dtype, device=rows.device) for p in parts)
            return ((rows - mean) / scale) @ coef + intercept
        soft = soft_trees(estimator)
        if soft is None:
            raise ValueError("the detector's classifier has no gradient, exact or smoothed "
                             "(only a logistic regression, a decision tree or boosted trees have one)")
        if temperature is None:
            raise ValueError("a tree detector's gradient is smoothed: pass the temperature of its splits")
        return soft.logit(rows, temperature)

    def predict(self, X) -> np.ndarray:
        """1 for inputs flagged adversarial (score at or above the threshold), 0 otherwise."""
        return (self.score_samples(X) >= self.operating_threshold).astype(np.int64)

    def detect(self, X, kappa) -> Detection:
        """Adversarial flag, score, κ and uncanny-valley flag for a batch."""
        if not hasattr(self, "valley_threshold_"):
            raise ValueError("the uncanny-valley threshold is not calibrated: fit with kappa=… or call calibrate()")
        score = self.score_samples(X)
        kappa = np.asarray(kappa, dtype=np.float64).ravel()
        if kappa.shape != score.shape:
            raise ValueError(f"kappa has {kappa.size} values for {score.size} inputs")
        flagged = score >= self.operating_threshold
        return Detection(flagged, score, kappa, flagged & (kappa <= self.valley_threshold_))


def _linear_parts(estimator) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    """(mean, scale, coef, intercept) of a fitted binary logistic regression, alone or after a
    ``StandardScaler`` (zeros and ones for what the scaler does not do), else None: its probability is
    ``sigmoid(((X − mean) / scale) @ coef + intercept)``.  Exact classes only, whose arithmetic this is."""
    scaler = None
    if type(estimator) is Pipeline:
        steps = [step for _, step in estimator.steps]
        if len(steps) == 2 and type(steps[0]) is StandardScaler:
            scaler, estimator = steps
        elif len(steps) == 1:
            estimator = steps[0]
        else:
            return None
    if type(estimator) is not LogisticRegression or not _sigmoid_of_decision(estimator):
        return None
    if estimator.coef_.shape[0] != 1:
        return None
    n = estimator.coef_.shape[1]
    centred, scaled = scaler is not None and scaler.with_mean, scaler is not None and scaler.with_std
    mean = scaler.mean_ if centred and scaler.mean_ is not None else np.zeros(n)
    scale = scaler.scale_ if scaled and scaler.scale_ is not None else np.ones(n)
    return mean, scale, estimator.coef_[0], float(estimator.intercept_[0])


def _sigmoid_of_decision(logistic: LogisticRegression) -> bool:
    """Whether a fitted binary logistic regression's probability is the sigmoid of its decision function
    (scikit-learn before 1.8 took a softmax over (−d, d) for ``multi_class="multinomial"``)."""
    return (getattr(logistic, "coef_", None) is not None
            and getattr(logistic, "multi_class", "auto") in ("auto", "ovr", "warn", "deprecated"))


def _logistic_proba(parts: tuple[np.ndarray, np.ndarray, np.ndarray, float], X: np.ndarray) -> np.ndarray:
    """``predict_proba`` of checked ``X`` from :func:`_linear_parts`: scikit-learn's operations in its
    order (a mean of zeros and a scale of ones change no bit), so the same floats, without the
    pipeline's validations of ``X``, which cost ten times the arithmetic on a batch of 32 (0.3 ms
    against 0.03 ms)."""
    mean, scale, coef, intercept = parts
    z = X - mean
    z /= scale
    p = expit((z @ coef[:, None] + intercept).reshape(-1))
    return np.stack([1 - p, p], axis=1)


class _CompiledBoosting:
    """A fitted binary ``HistGradientBoostingClassifier``'s ``predict_proba``, every tree at once.

    scikit-learn walks its trees one by one from Python (about 4 µs a tree: 0.4 ms for 100 trees, most
    of a single image's detection). Here all trees descend together, one numpy step per level, and the
    leaf values are added in scikit-learn's order, to its baseline, so that the answers are bit-identical
    (finite, numeric inputs only; anything else goes to scikit-learn).
    """

    def __init__(self, estimator: HistGradientBoostingClassifier):
        trees = [iteration[0] for iteration in estimator._predictors]
        sizes = np.array([len(t.nodes) for t in trees])
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        nodes = np.concatenate([t.nodes for t in trees])
        shift = np.repeat(offsets, sizes)
        self.roots = offsets
        self.feature = nodes["feature_idx"].astype(np.intp)
        self.threshold = nodes["num_threshold"].astype(np.float64)
        self.leaf = nodes["is_leaf"].astype(bool)
        self.left = np.where(self.leaf, 0, nodes["left"].astype(np.intp) + shift)
        self.right = np.where(self.leaf, 0, nodes["right"].astype(np.intp) + shift)
        self.value = nodes["value"].astype(np.float64)
        self.levels = int(nodes["depth"].max())
        self.baseline = estimator._baseline_prediction
        self.loss = estimator._loss

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        n = X.shape[0]
        node = np.broadcast_to(self.roots, (n, self.roots.size)).copy()
        rows = np.arange(n)[:, None]
        for _ in range(self.levels):
            go_left = X[rows, self.feature[node]] <= self.threshold[node]
            node = np.where(self.leaf[node], node, np.where(go_left, self.left[node], self.right[node]))
        values = self.value[node]
        raw = np.zeros((n, 1), dtype=self.baseline.dtype, order="F")
        raw += self.baseline
        for t in range(values.shape[1]):  # one tree at a time, as scikit-learn adds them
            raw[:, 0] += values[:, t]
        return self.loss.predict_proba(raw)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plain_boosting(estimator: HistGradientBoostingClassifier) -> bool:
    """Whether a fitted histogram-boosting classifier is binary on numeric features only: one tree per
    iteration, none with a categorical split."""
    return (estimator.n_trees_per_iteration_ == 1 and getattr(estimator, "is_categorical_", None) is None
            and not any(tree.nodes["is_categorical"].any() for iteration in estimator._predictors for tree in iteration))


def _compiled_boosting(estimator) -> _CompiledBoosting | None:
    """The compiled view of a plain binary histogram-boosting classifier (cached), else None."""
    if type(estimator) is not HistGradientBoostingClassifier:
        return None
    try:
        return _COMPILED[estimator]
    except KeyError:
        pass
    compiled = None
    try:
        if plain_boosting(estimator):
            compiled = _CompiledBoosting(estimator)
    except (AttributeError, KeyError, ValueError):  # another scikit-learn layout: use its own predict
        compiled = None
    _COMPILED[estimator] = compiled
    return compiled


#: Detectors by name: the paper's (a decision tree on ψ, flagged at P ≥ 0.5); ``curvature``
#: (gradient-boosted trees on both phases' output-layer features, flagged at a target false-positive
#: rate); ``layers`` (the same, plus class-conditional distances of three earlier layers and of φ);
#: ``activations`` (``layers``' rows plus those layers' channel means, under a logistic regression, which
#: generalised to unseen attacks better than boosting on so many columns: docs/RESULTS.md); ``gram``
#: (``activations`` plus the Gram matrices of the first conv and the first probed layer); ``every-layer``
#: (``activations``' rows over every convolution, each read as the channel means of its output clipped
#: at zero: a one-step attack spreads its change over every layer, and max(0, ·) keeps the part of it
#: that a plain mean, linear in the layer's input, averages away).
_BOOSTED = HistGradientBoostingClassifier(max_iter=100, max_depth=3, min_samples_leaf=20, l2_regularization=1.0,
                                          early_stopping=False, random_state=0)
_LOGISTIC = Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression(C=1.0, max_iter=2000))])
DETECTORS = {
    "paper": dict(features="psi", estimator=None, target_fpr=None),
    "curvature": dict(
        features="curvature",
        # Shallow and regularised, as a few hundred clean images per class are common; unconstrained
        # boosting was not consistently better on digits (two seeds).
        estimator=_BOOSTED,
        target_fpr=0.05),
    "layers": dict(features="curvature", probes=3, estimator=_BOOSTED, target_fpr=0.05),
    "activations": dict(features="curvature", probes=3, probe_means=True, estimator=_LOGISTIC, target_fpr=0.05),
    "agreement": dict(features="curvature", probes=3, probe_means=True, probe_agreement=True, estimator=_LOGISTIC,
                      target_fpr=0.05),
    "gram": dict(features="curvature", probes=3, probe_means=True, probe_gram=True, estimator=_LOGISTIC,
                 target_fpr=0.05),
    "every-layer": dict(features="curvature", probes=EVERY_CONV, probe_means=True, probe_rectified=True,
                        estimator=_LOGISTIC, target_fpr=0.05),
}

#: The detector ``detector-train`` fits unless told otherwise: the one the full attack suite favoured
#: (docs/RESULTS.md).  On CIFAR-10 it catches more of every L∞ attack of 4/255 or more, and of the
#: margin-capped one, than ``layers``; an attacker who descends the detector's score gets past either
#: (through softened trees for ``layers``), so the trees' lack of a gradient buys no safety.
DEFAULT_DETECTOR = "activations"


#: The classifiers a detector can put on its features (``--estimator``): what each detector kind uses
#: by default is in :data:`DETECTORS`; the others are there to compare against.
ESTIMATORS = {
    "tree": DecisionTreeClassifier(min_samples_leaf=5, random_state=0),
    "boosting": _BOOSTED,
    "logistic": _LOGISTIC,
}


def make_detector(name: str, *, target_fpr: float | None = None, random_state: int | None = 0,
                  estimator: str | None = None) -> UncannyValleyDetector:
    """An unfitted detector of the kind ``name`` (one of :data:`DETECTORS`), with the classifier
    ``estimator`` (one of :data:`ESTIMATORS`) instead of its own when given."""
    try:
        params = {k: clone(v) if hasattr(v, "get_params") else v for k, v in DETECTORS[name].items()}
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}") from None
    if estimator is not None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
        params["estimator"] = clone(ESTIMATORS[estimator])
    if target_fpr is not None:
        params["target_fpr"] = target_fpr
    return UncannyValleyDetector(random_state=random_state, **params)
