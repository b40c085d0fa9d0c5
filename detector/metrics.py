"""Detection metrics as plain functions of arrays, in the style of ``sklearn.metrics``.

Rates come with Wilson score intervals: a detection rate over 40 adversarials is not the same
claim as one over 4,000, and the report says which it is.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = ["Rate", "auroc", "budget_summary", "evasion_budget", "evasion_rate", "quantile_interval", "rate",
           "roc_point", "roc_rates", "tpr_at_fpr", "wilson_interval"]


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(0, 1)`` when ``n`` is 0."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    if n == 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or n successes a bound is exactly 0 or 1; the formula leaves a rounding error there.
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


class Rate(dict):
    """``{"rate", "k", "n", "low", "high"}``: a proportion with its 95% Wilson interval (JSON-ready)."""

    @classmethod
    def of(cls, flags) -> "Rate":
        flags = np.asarray(flags)
        if flags.dtype.kind == "f" and not np.isfinite(flags).all():  # NaN would count as true
            raise ValueError("flags must be true or false, not NaN or infinite")
        flags = flags.astype(bool).ravel()
        k, n = int(flags.sum()), int(flags.size)
        low, high = wilson_interval(k, n)
        return cls(rate=(k / n) if n else float("nan"), k=k, n=n, low=low, high=high)


def rate(flags) -> Rate:
    """The share of true values in ``flags``, with its interval."""
    return Rate.of(flags)


def evasion_rate(success, flagged) -> Rate:
    """Share of attacked inputs that end misclassified AND unflagged: what got past classifier and detector."""
    success = np.asarray(success, dtype=bool).ravel()
    flagged = np.asarray(flagged, dtype=bool).ravel()
    if success.shape != flagged.shape:
        raise ValueError(f"success has {success.size} values, flagged {flagged.size}")
    return Rate.of(success & ~flagged)


def auroc(y_true, score) -> float:
    """Area under the ROC curve of ``score`` for ``y_true`` (1 = adversarial); NaN when one class is missing."""
    y_true = np.asarray(y_true).ravel()
    if np.unique(y_true).size < 2:
        return float("nan")
    return float(roc_auc_score(y_true, np.asarray(score, dtype=np.float64).ravel()))


def tpr_at_fpr(y_true, score, fpr: float = 0.05) -> float:
    """True-positive rate on the ROC polyline where the false-positive rate is ``fpr``.

    Between two vertices the rate is interpolated: the usual reading for scores with ties (a tree),
    reached by randomising between the two thresholds.
    """
    if not 0.0 <= fpr <= 1.0:  # NaN fails too
        raise ValueError(f"fpr must be a rate in [0, 1], got {fpr!r}")
    y_true = np.asarray(y_true).ravel()
    if np.unique(y_true).size < 2:
        return float("nan")
    x, y, _ = roc_curve(y_true, np.asarray(score, dtype=np.float64).ravel())
    return roc_point(x, y, fpr)


def roc_point(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """y on the ROC polyline where x = ``at`` (x, y non-decreasing from (0, 0) to (1, 1)); on a
    vertical stretch at exactly ``at`` the largest y.  A tree scores in few distinct values, so the
    curve has few vertices; points between two vertices are reached by randomising between their
    thresholds, the usual reading of TPR at a fixed FPR."""
    if not 0.0 <= at <= 1.0:  # NaN fails too
        raise ValueError(f"the point must be a rate in [0, 1], got {at!r}")
    i = int(np.searchsorted(x, at, side="right")) - 1  # last vertex with x ≤ at
    if i >= len(x) - 1 or x[i] == at:
        return float(y[i])
    return float(y[i] + (y[i + 1] - y[i]) * (at - x[i]) / (x[i + 1] - x[i]))


def roc_rates(fpr: np.ndarray, tpr: np.ndarray) -> tuple[float, float]:
    """TPR at 5% FPR and TNR at 95% TPR, read off an ROC polyline (``sklearn.metrics.roc_curve``)."""
    tpr_at = roc_point(fpr, tpr, 0.05)
    # FPR as a function of TPR: the smallest FPR reaching 95% TPR, again on the polyline.
    i = int(np.searchsorted(tpr, 0.95, side="left"))  # first vertex with tpr ≥ 0.95
    if i == 0 or tpr[i] == 0.95:
        fpr_at = float(fpr[i])
    else:
        fpr_at = float(fpr[i - 1] + (fpr[i] - fpr[i - 1]) * (0.95 - tpr[i - 1]) / (tpr[i] - tpr[i - 1]))
    return tpr_at, 1.0 - fpr_at


def evasion_budget(perturbation, evaded) -> np.ndarray:
    """Per input, the smallest perturbation at which any attack evaded (misclassified and unflagged).

    ``perturbation`` and ``evaded`` are ``[n_attacks, n_inputs]``; inputs no attack evaded get +inf
    (their budget is beyond what the attacks tried).
    """
    perturbation = np.asarray(perturbation, dtype=np.float64)
    evaded = np.asarray(evaded, dtype=bool)
    if perturbation.shape != evaded.shape or perturbation.ndim != 2:
        raise ValueError(f"perturbation {perturbation.shape} and evaded {evaded.shape} must be the same "
                         f"[n_attacks, n_inputs] shape")
    if perturbation.shape[0] == 0:
        return np.full(perturbation.shape[1], np.inf)
    return np.where(evaded, perturbation, np.inf).min(axis=0)


def quantile_interval(values, q: float, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the ``q``-quantile from order statistics: the ranks a
    Binomial(n, q) count falls between with ``confidence``.  Bounds may be ±inf."""
    from scipy.stats import binom

    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = v.size
    if n == 0:
        return float("nan"), float("nan")
    lo = int(binom.ppf((1 - confidence) / 2, n, q))  # ranks, 1-based; 0 means "below the smallest"
    hi = int(binom.ppf(1 - (1 - confidence) / 2, n, q)) + 1
    return (float(v[lo - 1]) if lo >= 1 else -np.inf), (float(v[hi - 1]) if hi <= n else np.inf)


def budget_summary(budget) -> dict:
    """Median and quartiles of per-input evasion budgets (inf: not evaded), the median's 95% interval,
    the share of inputs evaded at all and the median budget of those.  Quantiles are actual budgets (no interpolation), so
    an infinite one means "more than the attacks tried" and is written as None."""
    b = np.asarray(budget, dtype=np.float64).ravel()

    def finite(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    if b.size == 0:
        return {"n": 0, "evaded": rate([]), "q1": None, "median": None, "q3": None, "median_interval": [None, None],
                "median_of_evaded": None}
    q1, median, q3 = (np.quantile(b, q, method="inverted_cdf") for q in (0.25, 0.5, 0.75))
    low, high = quantile_interval(b, 0.5)
    evaded = b[np.isfinite(b)]
    return {"n": int(b.size), "evaded": rate(np.isfinite(b)), "q1": finite(q1), "median": finite(median),
            "q3": finite(q3), "median_interval": [finite(max(low, 0.0)), finite(high)],
            "median_of_evaded": float(np.quantile(evaded, 0.5, method="inverted_cdf")) if evaded.size else None}
