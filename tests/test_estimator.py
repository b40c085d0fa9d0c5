"""The detector estimator on ψ/κ from a real model and real PGD."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression

from detector import UncannyValleyDetector, analyze, pgd


@pytest.fixture(scope="module")
def features(digits_model, digits_test):
    x, y = digits_test.batch(slice(None))
    clean = analyze(digits_model, x)
    keep = (clean.predictions == y).numpy()
    adv = analyze(digits_model, pgd(digits_model, x, y, eps=0.15, alpha=0.0375, steps=10))
    keep &= (adv.predictions != y).numpy()
    psi = np.concatenate([clean.psi.numpy()[keep], adv.psi.numpy()[keep]])
    kappa = np.concatenate([clean.sharpness.numpy()[keep], adv.sharpness.numpy()[keep]])
    label = np.r_[np.zeros(keep.sum(), int), np.ones(keep.sum(), int)]
    order = np.random.default_rng(0).permutation(len(label))
    return psi[order], kappa[order], label[order]


def test_fit_predict_and_calibrate(features):
    psi, kappa, label = features
    half = len(label) // 2
    det = UncannyValleyDetector().fit(psi[:half], label[:half], kappa=kappa[:half])
    assert det.valley_threshold_ == pytest.approx(np.median(kappa[:half][label[:half] == 0]))
    proba = det.predict_proba(psi[half:])
    assert proba.shape == (len(label) - half, 2) and np.allclose(proba.sum(1), 1)
    assert set(np.unique(det.predict(psi[half:]))) <= {0, 1}
    assert det.score(psi[half:], label[half:]) > 0.7  # 5-fold CV on all digits at ε = 0.15: 0.84

    result = det.detect(psi[half:], kappa[half:])
    assert np.array_equal(result.adversarial, det.predict(psi[half:]).astype(bool))
    assert np.array_equal(result.uncanny_valley,
                          result.adversarial & (kappa[half:] <= det.valley_threshold_))
    assert np.all((0 <= result.adversarial_score) & (result.adversarial_score <= 1))


def test_quantile_and_estimator_are_configurable(features):
    psi, kappa, label = features
    det = UncannyValleyDetector(estimator=LogisticRegression(max_iter=500), valley_quantile=0.9)
    det.fit(psi, label, kappa=kappa)
    assert isinstance(det.estimator_, LogisticRegression)
    assert det.valley_threshold_ == pytest.approx(np.quantile(kappa[label == 0], 0.9))
    assert clone(det).get_params()["valley_quantile"] == 0.9
    det.calibrate([1.0, 2.0, 3.0])
    assert det.valley_threshold_ == pytest.approx(2.8)  # the 0.9 quantile


def test_errors(features):
    psi, kappa, label = features
    with pytest.raises(ValueError, match="both clean"):
        UncannyValleyDetector().fit(psi, np.zeros_like(label))
    det = UncannyValleyDetector().fit(psi, label)
    with pytest.raises(ValueError, match="features"):
        det.predict(psi[:, :3])
    with pytest.raises(ValueError, match="not calibrated"):
        det.detect(psi, kappa)  # not calibrated yet
    with pytest.raises(ValueError, match="finite"):
        det.calibrate([np.nan])


@pytest.mark.parametrize("estimator", ["tree", "boosting", "logistic"])
def test_every_estimator_fits_with_weights_and_survives_the_bundle_format(estimator):
    """``--estimator``: each choice takes sample weights, scores continuously enough to set an operating
    point, and is stored in the skops format with the trusted types alone."""
    import skops.io

    from detector.bundle import TRUSTED_TYPES
    from detector.estimator import make_detector

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6))
    y = (X[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(int)
    det = make_detector("curvature", estimator=estimator).fit(X, y, kappa=np.abs(X[:, 1]), calibration=X[y == 0],
                                                              sample_weight=rng.uniform(0.5, 2.0, 400))
    assert det.calibration_fpr_ <= 0.05
    data = skops.io.dumps(det)
    assert set(skops.io.get_untrusted_types(data=data)) <= set(TRUSTED_TYPES)
    back = skops.io.loads(data, trusted=list(TRUSTED_TYPES))
    assert np.array_equal(back.score_samples(X), det.score_samples(X))
    with pytest.raises(ValueError, match="unknown estimator"):
        make_detector("curvature", estimator="forest")
