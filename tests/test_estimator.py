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


@pytest.mark.parametrize("max_depth", [3, None])
def test_boosted_trees_scored_all_at_once_answer_bit_for_bit_as_scikit_learn(max_depth):
    """The compiled histogram-boosting path (every tree descends together) against scikit-learn's own
    predict_proba: the same floats, on the fitting rows, on rows far outside them, and one by one."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from detector.estimator import _compiled_boosting

    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 8))
    y = (X[:, 0] * X[:, 1] + 0.3 * rng.normal(size=600) > 0).astype(int)
    est = HistGradientBoostingClassifier(max_iter=60, max_depth=max_depth, early_stopping=False,
                                         random_state=0).fit(X, y)
    compiled = _compiled_boosting(est)
    assert compiled is not None
    edge = X[:100].copy()  # rows exactly on split thresholds: "<=" and "<" part ways there
    splits = np.flatnonzero(~compiled.leaf)[:100]
    edge[np.arange(len(splits)), compiled.feature[splits]] = compiled.threshold[splits]
    for rows in (X, 10 * rng.normal(size=(200, 8)), X[:1], edge):
        assert np.array_equal(compiled.predict_proba(rows), est.predict_proba(rows))
    det = UncannyValleyDetector(estimator=est).fit(X, y)
    assert np.array_equal(det.predict_proba(X), det.estimator_.predict_proba(X))
    categorical = HistGradientBoostingClassifier(max_iter=5, categorical_features=[0]).fit(
        np.c_[rng.integers(0, 3, 600), X[:, 1:]], y)
    assert _compiled_boosting(categorical) is None  # scikit-learn's own path for what is not plain


def test_logistic_detector_scores_bit_for_bit_as_its_scikit_learn_pipeline():
    """A logistic-regression detector, scored without the pipeline's validations, against scikit-learn's
    own predict_proba: the same floats, on the fitting rows, far outside them and one by one, for the
    default pipeline and for every scaler setting; a pipeline of another shape goes through scikit-learn."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    from detector.estimator import _linear_parts, make_detector

    rng = np.random.default_rng(2)
    X = rng.normal(loc=3.0, scale=[1.0, 5.0, 0.1, 2.0, 1.0], size=(500, 5))
    y = (X[:, 0] - 3 + X[:, 2] * 10 - 30 + rng.normal(size=500) > 0).astype(int)
    det = make_detector("curvature", estimator="logistic").fit(X, y, calibration=X[y == 0])
    detectors = [det] + [UncannyValleyDetector(estimator=make_pipeline(*steps, LogisticRegression())).fit(X, y)
                         for steps in ([StandardScaler(with_mean=False)], [StandardScaler(with_std=False)], [])]
    for d in detectors:
        assert _linear_parts(d.estimator_) is not None
        for rows in (X, 100 * rng.normal(size=(50, 5)), X[:1], np.asfortranarray(X)):
            assert np.array_equal(d.predict_proba(rows), d.estimator_.predict_proba(rows))
    other = UncannyValleyDetector(estimator=make_pipeline(MinMaxScaler(), LogisticRegression())).fit(X, y)
    assert _linear_parts(other.estimator_) is None
    assert np.array_equal(other.predict_proba(X), other.estimator_.predict_proba(X))


@pytest.mark.parametrize("kind", ["paper", "curvature"])
def test_softened_trees_tend_to_the_trees_and_descend_their_score(kind):
    """A tree detector's smoothed logit: the trees' own answer as the temperature goes to 0, and at a
    working temperature a gradient whose descent lowers the real (hard) score."""
    import torch

    from detector.estimator import make_detector

    rng = np.random.default_rng(2)
    X = rng.normal(size=(800, 6))
    X[:, 5] = 0.0  # constant in fitting: no tree splits on it
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 + 0.3 * rng.normal(size=800) > 0.5).astype(int)
    det = make_detector(kind).fit(X, y, calibration=X[y == 0])
    assert det.gradient == "smoothed"
    rows = torch.as_tensor(rng.normal(size=(300, 6)))
    exact = det.score_samples(rows.numpy())
    sharp = torch.sigmoid(det.decision_tensor(rows, temperature=1e-9)).numpy()
    np.testing.assert_allclose(sharp, exact, atol=1e-6)
    soft = rows.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(det.decision_tensor(soft, temperature=0.3).sum(), soft)
    assert torch.isfinite(grad).all() and (grad.abs().sum(dim=1) > 0).float().mean() > 0.9
    stepped = det.score_samples((rows - 0.3 * grad.sign()).numpy())
    assert stepped.mean() < exact.mean() - 0.1  # descending the stand-in lowers the trees' own score
    # one temperature per feature, each on its own feature: blurring a feature the trees never split
    # on changes nothing, blurring the one they split on most changes the answer
    used = np.bincount(det.estimator_.tree_.feature[det.estimator_.tree_.feature >= 0], minlength=6) \
        if kind == "paper" else np.bincount(
            np.concatenate([p[0].nodes["feature_idx"][~p[0].nodes["is_leaf"].astype(bool)]
                            for p in det.estimator_._predictors]), minlength=6)
    for feature, changes in ((int(np.argmin(used)), False), (int(np.argmax(used)), True)):
        if not changes:
            assert feature == 5 and used[feature] == 0
        temperature = torch.full((6,), 1e-9, dtype=torch.float64)
        temperature[feature] = 1e3
        blurred = torch.sigmoid(det.decision_tensor(rows, temperature=temperature)).numpy()
        assert (np.abs(blurred - exact).max() > 0.05) == changes
    with pytest.raises(ValueError, match="positive"):
        det.decision_tensor(rows, temperature=torch.zeros(6))
    # An infinite feature (log ψ of an underflowed softmax) keeps the logit a number, as the trees' own
    # score is one: padding steps of short paths must not turn 0 · ∞ into NaN.
    extreme = rows.clone()
    extreme[:, 0] = -torch.inf
    extreme[:5, 1] = torch.inf
    assert torch.isfinite(det.decision_tensor(extreme, temperature=0.3)).all()
    from detector.smoothing import split_temperature

    heavy = torch.as_tensor(np.c_[rng.lognormal(-16, 4, 500), rng.normal(size=500)])
    spread = split_temperature(heavy, 1.0)  # robust: the lognormal's outliers do not set its scale
    assert spread[0] < 0.01 * heavy[:, 0].std() and abs(float(spread[1]) - 1.0) < 0.2
