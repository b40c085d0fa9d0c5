"""The attack suite, its metrics and the evaluation: real attacks on a real small model and bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detector import UncannyValleyDetector, load_bundle, load_dataset, pgd
from detector.attacks import (
    ATTACKS,
    PGDResult,
    backoff_pgd,
    get_attack,
    list_attacks,
    margin_capped_pgd,
    register_attack,
)
from detector.estimator import flagging_threshold, make_detector
from detector.evaluation import (
    attack_suite,
    check_disjoint,
    evaluate,
    held_out_images,
    landing,
    logit_margin,
    same_attack,
)
from detector.metrics import (
    auroc,
    budget_summary,
    evasion_budget,
    evasion_rate,
    quantile_interval,
    rate,
    tpr_at_fpr,
    wilson_interval,
)
from detector.shifts import SHIFTS, apply_shift

# --- metrics -------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    # Textbook values (Agresti & Coull 1998; Newcombe 1998, method 3).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0  # exactly, not 2.8e-17 off
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    for confidence in (0, 1, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            wilson_interval(5, 10, confidence)


def test_rates_count_what_they_say():
    r = rate([True, False, True, True])
    assert (r["k"], r["n"], r["rate"]) == (3, 4, 0.75) and r["low"] < 0.75 < r["high"]
    success = np.array([1, 1, 1, 0, 0], bool)
    flagged = np.array([1, 0, 0, 1, 0], bool)
    # misclassified AND unflagged: rows 1 and 2, over all five attacked
    ev = evasion_rate(success, flagged)
    assert (ev["k"], ev["n"]) == (2, 5)
    with pytest.raises(ValueError):
        evasion_rate(success, flagged[:3])
    with pytest.raises(ValueError, match="not NaN"):  # NaN is truthy: it would count as flagged
        rate(np.array([np.nan, 0.0]))
    assert rate(np.array([1.0, 0.0]))["k"] == 1


def test_evasion_budget_is_the_cheapest_evading_attack():
    size = [[0.3, 0.1, 0.2, 0.5], [0.2, 0.4, 0.1, 0.5]]
    evaded = [[True, True, False, False], [True, False, False, False]]
    assert evasion_budget(size, evaded).tolist() == [0.2, 0.1, np.inf, np.inf]
    summary = budget_summary(evasion_budget(size, evaded))
    assert summary["evaded"]["k"] == 2 and summary["q1"] == 0.1 and summary["median"] == 0.2
    assert summary["q3"] is None  # beyond every attack: not a number to quote
    assert summary["median_of_evaded"] == 0.1
    with pytest.raises(ValueError, match="shape"):
        evasion_budget([[0.1, 0.2]], [[True]])
    assert evasion_budget(np.zeros((0, 3)), np.zeros((0, 3), dtype=bool)).tolist() == [np.inf] * 3


def test_median_interval_covers_the_median():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):  # a 95% interval for the median of U(0, 1) samples: covers 0.5 about 95% of the time
        low, high = quantile_interval(rng.uniform(size=60), 0.5)
        covered += low <= 0.5 <= high
    assert 180 <= covered <= 200
    low, high = quantile_interval([1.0, 2.0, 3.0], 0.5)  # too few for a finite interval
    assert low == -np.inf and high == np.inf


def test_auroc_and_tpr_at_fpr():
    y = np.r_[np.zeros(4), np.ones(4)]
    assert auroc(y, [0, 1, 2, 3, 4, 5, 6, 7]) == 1.0
    assert auroc(y, [7, 6, 5, 4, 3, 2, 1, 0]) == 0.0
    assert np.isnan(auroc(np.ones(3), [1, 2, 3]))
    # scores 0..9 clean, 5..14 adversarial: at FPR 0 the threshold sits above 9, catching 10..14
    y = np.r_[np.zeros(10), np.ones(10)]
    score = np.r_[np.arange(10), np.arange(5, 15)]
    assert tpr_at_fpr(y, score, 0.0) == pytest.approx(0.5)
    assert tpr_at_fpr(y, score, 0.1) == pytest.approx(0.6)
    for impossible in (-0.1, 1.5, float("nan")):  # would read off a rate outside the curve
        with pytest.raises(ValueError, match="rate in"):
            tpr_at_fpr(y, score, impossible)


def test_flagging_threshold_is_at_or_above_and_keeps_the_rate():
    clean = np.arange(100, dtype=float) / 100  # 0.00 … 0.99
    t = flagging_threshold(clean, 0.05)
    assert np.mean(clean >= t) == 0.05  # exactly five flagged: 0.95 … 0.99
    assert t > 0.94 and t <= 0.95
    ties = np.r_[np.zeros(90), np.full(10, 0.5)]
    t = flagging_threshold(ties, 0.05)  # the tied block cannot be split: none of it is flagged
    assert np.mean(ties >= t) == 0.0 and t > 0.5
    assert flagging_threshold(clean, 0.0) > clean.max()


def test_predict_flags_scores_at_the_threshold(digits_model, digits_test):
    """"At or above": an input whose score equals the threshold is flagged, by predict and by detect."""
    x = np.r_[np.zeros((20, 2)), np.ones((20, 2))]
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    det = UncannyValleyDetector().fit(x, y, kappa=np.ones(40))
    score = det.score_samples(x)
    det.threshold_ = float(score.max())  # exactly the adversarial rows' score
    assert det.predict(x[20:]).all()
    assert det.detect(x[20:], np.ones(20)).adversarial.all()
    assert (det.decision_function(x[20:]) == 0).all()


def test_operating_point_is_fitted_on_calibration_rows():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (300, 3)), rng.normal(2, 1, (300, 3))]
    y = np.r_[np.zeros(300, int), np.ones(300, int)]
    calibration = rng.normal(0, 1, (400, 3))
    det = make_detector("curvature", target_fpr=0.05)
    with pytest.raises(ValueError, match="calibration"):
        det.fit(x, y)
    det.fit(x, y, calibration=calibration)
    assert det.calibration_fpr_ <= 0.05 and det.n_calibration_ == 400
    assert np.mean(det.predict(calibration)) == det.calibration_fpr_
    fresh = rng.normal(0, 1, (2000, 3))
    assert np.mean(det.predict(fresh)) < 0.09  # held-out clean: near the target, not 0.5


def test_easy_variants_do_not_buy_false_positives_on_inputs_as_they_came():
    """Calibration rows of clean inputs plus changed copies that look even cleaner: pooled, 5% of all
    rows lets through 3× more of the inputs as they came; marked, those stay at or under 5% too."""
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(0, 1, (300, 3)), rng.normal(2, 1, (300, 3))]
    y = np.r_[np.zeros(300, int), np.ones(300, int)]
    as_came, easy = rng.normal(0, 1, (200, 3)), rng.normal(-3, 1, (400, 3))
    calibration = np.r_[as_came, easy]
    mask = np.r_[np.ones(200, bool), np.zeros(400, bool)]
    pooled = make_detector("curvature", estimator="logistic", target_fpr=0.05).fit(x, y, calibration=calibration)
    assert np.mean(pooled.predict(as_came)) > 0.1  # what the mask is for
    det = make_detector("curvature", estimator="logistic", target_fpr=0.05).fit(x, y, calibration=calibration,
                                                                                calibration_as_given=mask)
    assert np.mean(det.predict(as_came)) == det.calibration_fpr_as_given_ <= 0.05
    assert det.calibration_fpr_ <= 0.05 and det.threshold_ > pooled.threshold_
    # Harder variants (the default's noise): the pooled threshold already holds the inputs as they came.
    hard = np.r_[as_came, rng.normal(1, 1, (400, 3))]
    both = [make_detector("curvature", estimator="logistic", target_fpr=0.05).fit(
        x, y, calibration=hard, calibration_as_given=m) for m in (None, mask)]
    assert both[0].threshold_ == both[1].threshold_
    with pytest.raises(ValueError, match="as_given"):
        det.set_operating_point(calibration, as_given=np.zeros(600, bool))


# --- attacks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.batch(slice(0, 32))


def test_registry_refuses_duplicates_and_unknown_names():
    assert {"fgsm", "pgd", "pgd-early-stop", "cw-l2", "deepfool", "apgd-ce", "square",
            "margin-capped", "backoff", "feature-matching"} <= set(list_attacks())
    assert set(list_attacks("minimal")) == {"pgd-early-stop", "cw-l2", "deepfool"}
    with pytest.raises(ValueError, match="already registered"):
        register_attack("pgd", kind="budget", norm="linf")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("nope")
    assert ATTACKS["pgd"].fn is pgd


def test_the_evaluation_knows_which_attacks_the_detector_was_fitted_on():
    """An attack counts as seen in fitting when the detector learned adversarials of the same attack
    with the same parameters; a random start, another radius or another norm is another attack."""
    from training.fitting import fit_attacks, seen_in_fitting

    assert same_attack("pgd", {"eps": 0.1, "steps": 10, "seed": 3}, "pgd", {"eps": 0.1 + 1e-12, "steps": 10})
    assert same_attack("pgd", {"eps": 0.1}, "pgd", {"eps": 0.1, "random_start": False})
    assert not same_attack("pgd", {"eps": 0.1, "random_start": True, "seed": 0}, "pgd", {"eps": 0.1})
    assert not same_attack("pgd", {"eps": 0.1, "steps": 10}, "pgd", {"eps": 0.1, "steps": 50})
    assert not same_attack("pgd", {"eps": 0.1}, "pgd", {"eps": 0.1, "alpha": 0.02})
    assert not same_attack("pgd", {"eps": 0.1}, "pgd-l2", {"eps": 0.1})
    records = [{"label": e.label, "attack": e.attack, "params": e.params} for e in attack_suite(8 / 255, level="full")]
    pgd8 = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "norm": "linf", "random_start": False}
    # A report that counts its sources but does not list their parameters: read from the recipe.
    sources = {label: 9 for label in fit_attacks("activations", pgd8)}
    fitted_on = {"clean": {"clean images": 9, "JPEG q75": 9}, "adversarial": sources}
    report = {"detection": {"detector": "activations", "fitted_on": fitted_on}, "attack": pgd8}
    assert seen_in_fitting(report, records) == ["JPEG q75", "FGSM L∞ 8/255", "PGD-10 L∞ 2/255", "PGD-10 L∞ 8/255"]
    fitted_on["adversarial"] = {"final PGD iterate": 9}
    assert seen_in_fitting(report, records) == ["JPEG q75"]  # sources the recipe does not name: none told
    report["detection"]["detector"] = "paper"  # its tree learns the final PGD iterate only
    assert seen_in_fitting(report, records) == ["JPEG q75", "PGD-10 L∞ 8/255"]
    # What the report records wins over the recipe: a detector fitted at 4/255 saw PGD-10 4/255.
    report["detection"]["fitted_on"]["attacks"] = fit_attacks("activations", {**pgd8, "eps": 4 / 255,
                                                                              "alpha": 1 / 255})
    assert seen_in_fitting(report, records) == ["JPEG q75", "PGD-10 L∞ 4/255"]
    # An L2 recording keeps its extra sources in L2.
    l2 = fit_attacks("activations", {"eps": 0.5, "alpha": 0.125, "steps": 10, "norm": "l2"})
    assert {a["attack"] for a in l2.values()} == {"pgd-l2"}
    report["detection"]["fitted_on"]["attacks"] = l2
    assert seen_in_fitting(report, records) == ["JPEG q75", "PGD-10 L2 0.5"]


def test_success_is_read_at_the_last_step():
    labels = torch.tensor([0, 0])
    predictions = torch.tensor([[0, 1, 0], [0, 0, 1]])  # the first flips back, the second flips last
    empty = torch.zeros(2, 3)
    result = PGDResult(torch.zeros(2, 1, 1, 1), empty, empty, predictions, torch.zeros(2, 3, 2), labels,
                       torch.zeros(2, 3, 2), empty)
    assert result.success.tolist() == [False, True]


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd-l2", "pgd-early-stop", "apgd-ce", "cw-l2", "deepfool", "square"])
def test_every_attack_keeps_pixels_and_its_budget(digits_model, batch, name):
    x, y = batch
    params = {"fgsm": dict(eps=0.2), "pgd": dict(eps=0.2, alpha=0.05, steps=5),
              "pgd-l2": dict(eps=1.5, alpha=0.4, steps=5), "pgd-early-stop": dict(eps=0.2, alpha=0.02, steps=20),
              "apgd-ce": dict(eps=0.2, steps=5), "cw-l2": dict(steps=10, lr=0.05), "deepfool": dict(steps=10),
              "square": dict(eps=0.2, n_queries=100)}[name]
    info = get_attack(name)
    digits_model.train()
    try:
        x_adv = info.fn(digits_model, x, y, **params)
        assert digits_model.training, "the caller's mode is restored"
    finally:
        digits_model.eval()
    assert x_adv.shape == x.shape and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    delta = (x_adv - x).flatten(1)
    if "eps" in params:
        size = delta.abs().amax(1) if info.norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= params["eps"] + 1e-5
    with torch.no_grad():
        fooled = (digits_model(x_adv).argmax(1) != y).float().mean()
    assert fooled > 0.2, f"{name} fooled only {fooled:.0%}"


def test_early_stop_freezes_each_example_at_its_first_misclassification(digits_model, batch):
    x, y = batch
    full = pgd(digits_model, x, y, eps=0.3, alpha=0.02, steps=30, record=True)
    early = pgd(digits_model, x, y, eps=0.3, alpha=0.02, steps=30, record=True, early_stop=True)
    wrong = early.predictions != y[:, None]
    first = torch.where(wrong.any(1), wrong.int().argmax(1), torch.full_like(y, 30))
    for i in range(len(y)):
        t = int(first[i])
        if t < 30:  # once wrong, it stays exactly where it was: the loss no longer changes
            assert torch.allclose(early.loss[i, t:], early.loss[i, t].expand(31 - t))
    assert early.success.float().mean() > 0.9
    # stopping near the boundary spends less of the budget than going on into the valley
    assert (early.x_adv - x).abs().flatten(1).amax(1).median() < (full.x_adv - x).abs().flatten(1).amax(1).median()
    assert early.sharpness[:, -1].median() > full.sharpness[:, -1].median()


def test_margin_capped_attack_stays_as_unsure_as_asked(digits_model, batch):
    x, y = batch
    x_adv = margin_capped_pgd(digits_model, x, y, eps=0.3, alpha=0.02, steps=40, margin=2.0)
    with torch.no_grad():
        z = digits_model(x_adv)
    wrong = z.argmax(1) != y
    assert wrong.float().mean() > 0.8
    top2 = z[wrong].topk(2, dim=1).values
    # the wrong class leads by about the cap, not by the 20+ logits plain PGD reaches
    assert float((top2[:, 0] - top2[:, 1]).max()) < 2.0 + 20 * 0.02 * 30


def test_backoff_returns_a_misclassified_iterate_the_oracle_lets_through(digits_model, batch):
    x, y = batch

    def flagged(images):  # an oracle that flags everything past a perturbation of 0.2
        return (images - x.repeat_interleave(len(images) // len(x), 0)).abs().flatten(1).amax(1) > 0.2 + 1e-6

    x_adv = backoff_pgd(digits_model, x, y, eps=0.3, alpha=0.05, steps=6, flagged=flagged)
    with torch.no_grad():
        wrong = digits_model(x_adv).argmax(1) != y
    linf = (x_adv - x).abs().flatten(1).amax(1)
    # it backs off to misclassified iterates under the oracle's radius, which plain PGD overshoots
    assert (wrong & (linf <= 0.2 + 1e-6)).float().mean() > 0.5
    assert (linf[~wrong] > 0.2).all() or (~wrong).sum() == 0
    plain = pgd(digits_model, x, y, eps=0.3, alpha=0.05, steps=6)
    assert (plain - x).abs().flatten(1).amax(1).min() > 0.2


def test_feature_matching_keeps_its_least_suspicious_misclassified_iterate(digits_model, batch):
    from detector.attacks import feature_matching_pgd
    from detector.layers import feature_rows

    x, y = batch
    norm = float(digits_model.net.fc.weight.detach().norm())

    def features(z):
        rows, out = feature_rows(digits_model, z, feature_set="curvature", weight_norm=norm, grad=True)
        return out.logits, rows

    clean_rows = features(x)[1].detach().float()
    calls = []

    def score(z):  # a stand-in detector: suspicious in proportion to the perturbation
        calls.append(len(z))
        return (z - x).abs().flatten(1).amax(1)

    x_adv = feature_matching_pgd(digits_model, x, y, eps=0.3, alpha=0.02, steps=20, features=features,
                                 target=clean_rows.mean(0), scale=clean_rows.std(0), lam=0.1, score=score)
    with torch.no_grad():
        wrong = digits_model(x_adv).argmax(1) != y
    assert wrong.float().mean() > 0.9 and calls
    plain = pgd(digits_model, x, y, eps=0.3, alpha=0.02, steps=20)
    # the kept iterate is the least perturbed misclassified one, well inside what plain PGD ends at
    linf = (x_adv - x).abs().flatten(1).amax(1)
    assert linf[wrong].median() < (plain - x).abs().flatten(1).amax(1).median()


def _score_descent_evasion(bundle, decision):
    """Share of 120 test digits the score-descent attack (given ``decision``, or blind to the detector)
    gets misclassified and past ``bundle``'s detector, at the fitting radius."""
    from detector.attacks import score_descent_pgd

    x, y = load_dataset("digits", train=False).batch(slice(0, 120))
    keep = (bundle.model(x).argmax(1) == y).numpy()
    x, y = x[keep], y[keep]
    top2 = bundle.model(x).detach().topk(2, dim=1).values
    margin = float((top2[:, 0] - top2[:, 1]).median())

    def features(z):
        r, o = bundle.features_with_grad(z)
        return o.logits, r

    def score(z):
        return torch.as_tensor(bundle.detect(z).adversarial_score)

    x_adv = score_descent_pgd(bundle.model, x, y, eps=0.2, alpha=0.0125, steps=30, features=features, margin=margin,
                              lam=1.0, score=score, decision=decision)
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6
    answer = bundle.detect(x_adv)
    return float(((answer.labels != y.numpy()) & ~answer.adversarial).mean())


def test_score_descent_follows_a_linear_detectors_own_gradient(default_bundle):
    """The default (activations) detector is a logistic regression: its logit is exact and differentiable,
    and descending it gets far more misclassified digits past it than the same attack without it."""
    bundle = load_bundle(default_bundle)
    assert bundle.detector.gradient == "exact"
    x, _ = load_dataset("digits", train=False).batch(slice(0, 120))
    rows, _ = bundle.features_with_grad(x, grad=False)
    logit = bundle.detector.decision_tensor(rows.double()).detach()
    np.testing.assert_allclose(torch.sigmoid(logit).numpy(), bundle.detector.score_samples(rows.double().numpy()),
                               rtol=1e-6, atol=1e-9)
    # measured: 90% against 6% of 117 digits
    assert _score_descent_evasion(bundle, bundle.detector.decision_tensor) > _score_descent_evasion(bundle, None) + 0.3
    unfitted = make_detector("activations")
    assert unfitted.gradient is None
    with pytest.raises(ValueError, match="no gradient"):
        unfitted.decision_tensor(rows)


def test_score_descent_through_a_tree_detectors_softened_trees(layers_bundle):
    """The layers detector's boosted trees have no gradient of their own; softened to sigmoids they
    give the attacker one, and descending it gets far more digits past the real trees than the same
    attack blind to them."""
    from detector.evaluation import decision_for_attacker, describe_gradient

    bundle = load_bundle(layers_bundle)
    assert bundle.detector.gradient == "smoothed" and "softened" in describe_gradient(bundle)
    x, _ = load_dataset("digits", train=True).batch(slice(0, 200))
    clean_rows, _ = bundle.features_with_grad(x, grad=False)
    with pytest.raises(ValueError, match="temperature"):
        bundle.detector.decision_tensor(clean_rows)
    decision = decision_for_attacker(bundle, clean_rows)
    # measured: 84% against 21% of 117 digits
    assert _score_descent_evasion(bundle, decision) > _score_descent_evasion(bundle, None) + 0.3


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shifts_keep_shape_and_range(batch, name):
    x, _ = batch
    out = apply_shift(name, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    if name != "downscaled ×0.5":
        assert (out - x).abs().mean() < 0.2
    assert apply_shift(name, x[:0]).shape == (0, *x.shape[1:])  # an empty batch stays one


def test_shift_names_read_typed_symbols_and_any_magnitude(batch):
    """What ``--clean-variants`` accepts: a listed change is that very change (the same noise field),
    any magnitude of a family is built on demand, and a name it cannot read says what it can."""
    from detector.shifts import shift_name

    x, _ = batch
    assert shift_name("noise sigma=0.050") == "noise σ=0.05"
    assert torch.equal(apply_shift(shift_name("Noise sigma=0.05"), x), SHIFTS["noise σ=0.05"](x))
    assert shift_name("brightness x0.9") == "brightness ×0.9" and shift_name(" jpeg q30 ") == "JPEG q30"
    stronger, weaker = apply_shift("JPEG q10", x), apply_shift("JPEG q90", x)
    assert (stronger - x).abs().mean() > (weaker - x).abs().mean()  # the magnitude is the one named
    fresh = apply_shift("noise σ=0.04", x)  # not listed: the fitting's own noise field, not the evaluation's
    assert not torch.equal(fresh, SHIFTS["noise σ=0.05"](x))
    assert 0.02 < float((fresh - x).std()) < 0.05
    for typed in ("noise sigma=1e-5", "noise\tσ=0.1234567", "upscaled\u00a0x1.0000001", "JPEG q100", "blur r=.5"):
        name = shift_name(typed)  # every digit kept, no exponent: the name reads back as itself
        assert shift_name(name) == name and "e-" not in name
    assert shift_name("noise sigma=0.1234567") == "noise σ=0.1234567"
    for bad, message in (("jpeg q0", "must lie in"), ("jpeg q30.5", "whole number"), ("upscaled x0.5", "must lie"),
                         ("noise sigma=1e", "'1e' is not a number"),
                         ("sharpen", "unknown shift 'sharpen'; name one of: upscaled ×N")):
        with pytest.raises(ValueError, match=message):
            shift_name(bad)


# --- the evaluation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_and_split(default_bundle):
    split = json.loads((default_bundle / "split.json").read_text())
    return load_bundle(default_bundle), split


def test_evaluation_refuses_images_the_detector_saw(bundle_and_split):
    bundle, split = bundle_and_split
    test = load_dataset("digits", train=False)
    excluded = np.array(split["fit"] + split["calibration"])
    with pytest.raises(ValueError, match="fit or calibrate"):
        evaluate(bundle, test, np.array(split["fit"][:50]), excluded=excluded, suite=[], progress=False)
    with pytest.raises(ValueError, match="fit or calibrate"):
        check_disjoint([1, 2, 3], [3, 4])
    # A negative position names an image from the end: -1 is the last image, which the numbers as written hide.
    last = len(test) - 1
    for evaluated, held in (([-1], [last]), ([0, 1], [-3])):
        with pytest.raises(ValueError, match="positions in the split"):
            check_disjoint(evaluated, held)
    with pytest.raises(ValueError, match="positions in the split"):
        evaluate(bundle, test, np.array([-1, 0]), excluded=excluded, suite=[], progress=False)
    with pytest.raises(ValueError, match=f"positions in the split of {len(test)}, got {len(test)}"):
        evaluate(bundle, test, np.array([0, len(test)]), excluded=[], suite=[], progress=False)


def test_held_out_images_keep_the_split_share_of_mistakes():
    # 1,000 images, 900 right; the 300 fitted and calibrated ones are all right, as in the pipeline.
    rng = np.random.default_rng(0)
    correct = rng.permutation(np.r_[np.ones(900, bool), np.zeros(100, bool)])
    excluded = rng.permutation(np.flatnonzero(correct))[:300]
    left = np.setdiff1d(np.arange(1000), excluded)
    assert correct[left].mean() == pytest.approx(600 / 700)  # what a plain draw from the rest reads
    drawn = held_out_images(correct, excluded, 10_000, np.random.default_rng(1))
    assert correct[drawn].mean() == pytest.approx(0.9, abs=0.002)
    with pytest.raises(ValueError, match="at least 0"):  # a slice to -1 would drop one image silently
        held_out_images(correct, excluded, -1, np.random.default_rng(1))
    assert len(drawn) == 600 + 67 and not np.intersect1d(drawn, excluded).size
    assert (np.diff(drawn) > 0).all()
    some = held_out_images(correct, excluded, 100, np.random.default_rng(2))
    assert len(some) == 100 and set(some) <= set(left)
    assert (some == held_out_images(correct, excluded, 100, np.random.default_rng(2))).all()
    assert (some != held_out_images(correct, excluded, 100, np.random.default_rng(3))).any()
    # Drawn at random, not the lowest positions, and with the split's share in partial draws too.
    shares = [correct[held_out_images(correct, excluded, 100, np.random.default_rng(s))].mean() for s in range(200)]
    assert np.mean(shares) == pytest.approx(0.9, abs=0.005)
    assert some.max() > left[150]
    # A classifier right on every image, or wrong on every one, is drawn from as it is.
    assert len(held_out_images(np.ones(50, bool), [0, 1], 100, rng)) == 48
    assert len(held_out_images(np.zeros(50, bool), [0, 1], 100, rng)) == 48


def test_small_real_suite_counts_agree(bundle_and_split):
    bundle, split = bundle_and_split
    test = load_dataset("digits", train=False)
    excluded = np.array(split["fit"] + split["calibration"])
    pool = np.setdiff1d(np.arange(len(test)), excluded)
    suite = [e for e in attack_suite(0.2, 64, "quick") if e.attack in ("fgsm", "pgd", "pgd-early-stop")]
    ev = evaluate(bundle, test, pool, excluded=excluded, calibration=np.array(split["calibration"]),
                  suite=suite, shifts=["JPEG q75"], reference=load_dataset("digits", train=True), progress=False)
    d = ev.to_dict()
    assert set(d["image_ids"]["evaluated"]) == set(pool.tolist())
    assert not set(d["image_ids"]["evaluated"]) & set(excluded.tolist())
    for record in ev.attacks:
        # detection is counted over exactly the successful adversarials
        assert record.detection["n"] == record.success["k"] == len(record.scores)
        assert set(record.image_ids) <= set(pool.tolist())
        assert record.evasion["k"] == record.success["k"] - record.detection["k"]
        assert record.n_attacked == record.success["n"]
        assert 0.5 < record.auroc <= 1.0
        assert set(record.baselines) == {"max-softmax", "entropy", "kappa", "mahalanobis"}
    by_attack = {r.attack: r for r in ev.attacks}
    # the early-stopped attack spends less of its budget than PGD-10 at the same radius
    assert by_attack["pgd-early-stop"].median_linf < by_attack["pgd"].median_linf
    # accuracy under attack: the held-out images right before and after the attack
    n_correct = round(d["clean"]["accuracy"] * d["clean"]["n"])
    for record in ev.attacks:
        assert record.accuracy_under_attack == pytest.approx((n_correct - record.success["k"]) / d["clean"]["n"])
        assert len(record.linf) == len(record.l2) == len(record.evaded) == record.n_attacked
        assert sum(record.evaded) == record.evasion["k"]
    # evasion budget: per image the cheapest evading attack, recomputed here from the records
    budget = d["evasion_budget"]["groups"]
    assert set(budget) == {"all attacks", "budget", "minimal"}
    assert budget["minimal"]["attacks"] == [by_attack["pgd-early-stop"].label]
    for name, members in (("all attacks", ev.attacks), ("minimal", [by_attack["pgd-early-stop"]])):
        for norm in ("linf", "l2"):
            expected = [min((getattr(r, norm)[i] for r in members if r.evaded[i]), default=None)
                        for i in range(len(ev.attacks[0].image_ids))]
            assert budget[name][f"per_input_{norm}"] == pytest.approx(expected), (name, norm)
        evaded = [b is not None for b in budget[name]["per_input_linf"]]
        assert budget[name]["linf"]["evaded"]["k"] == sum(evaded)
        # over all images: the attacked ones and the wrong-but-unflagged clean ones (wrong and flagged: left out)
        wrong_flagged = d["clean"]["false_positives_all"]["k"] - d["clean"]["false_positives_correct"]["k"]
        assert budget[name]["linf_over_all"]["n"] == d["clean"]["n"] - wrong_flagged
    # more attacks can only make the budget smaller
    for everything, minimal in zip(budget["all attacks"]["per_input_linf"], budget["minimal"]["per_input_linf"]):
        assert minimal is None or everything <= minimal
    # landing margins: one per successful adversarial, split at the clean margins' 95th percentile
    clean_margins = np.array(d["clean"]["margins_correct"])
    assert len(clean_margins) == d["clean"]["false_positives_correct"]["n"]
    cut = np.quantile(clean_margins, 0.95)
    assert d["clean"]["margin_quantile"] == {"quantile": 0.95, "value": pytest.approx(cut)}
    for record in ev.attacks:
        margins = np.array(record.margins)
        assert len(margins) == record.success["k"] and (margins >= 0).all()
        assert record.beyond_clean["k"] == int((margins > cut).sum())
        assert record.detection_beyond["n"] + record.detection_within["n"] == record.detection["n"]
        assert record.detection_beyond["k"] + record.detection_within["k"] == record.detection["k"]
        assert record.median_margin == pytest.approx(np.median(margins))
    # an attack that stops at the first misclassification lands at the boundary, far inside clean margins;
    # ten full steps carry PGD further (margins read off the clean images instead would sit at the clean median)
    assert by_attack["pgd-early-stop"].median_margin < 0.25 * d["clean"]["median_margin"]
    assert by_attack["pgd"].median_margin > 2 * by_attack["pgd-early-stop"].median_margin
    assert d["held_out_draw"] is None  # as the caller said: this test passes the images itself
    clean = d["clean"]
    # the operating point was set for 5% on calibration images; held out it stays in that region
    assert clean["false_positives_correct"]["rate"] <= 0.2
    assert len(clean["scores_correct"]) == clean["false_positives_correct"]["n"]
    json.dumps(d)  # JSON-ready


def test_landing_splits_adversarials_at_the_clean_quantile():
    clean = np.arange(1, 101, dtype=float)  # 95th percentile 95.05
    margins = np.array([0.1, 50.0, 95.0, 95.1, 200.0])
    flagged = np.array([False, True, False, True, True])
    out = landing(margins, flagged, clean)
    assert out["median_margin"] == 95.0
    assert (out["beyond_clean"]["k"], out["beyond_clean"]["n"]) == (2, 5)  # 95.1 and 200: above 95.05
    assert (out["detection_beyond"]["k"], out["detection_beyond"]["n"]) == (2, 2)
    assert (out["detection_within"]["k"], out["detection_within"]["n"]) == (1, 3)
    assert landing(margins, flagged, clean, quantile=0.5)["beyond_clean"]["k"] == 3
    # at the cut itself is within: "beyond" is strictly above what 95% of clean images reach
    assert landing(np.array([50.0, 50.1]), np.array([True, True]), np.arange(101.0), 0.5)["beyond_clean"]["k"] == 1
    none = landing(np.array([]), np.array([], bool), clean)
    assert none["median_margin"] is None and none["beyond_clean"]["n"] == 0
    with pytest.raises(ValueError, match="5 margins but 4 flags"):
        landing(margins, flagged[:4], clean)
    with pytest.raises(ValueError, match="no clean margins"):
        landing(margins, flagged, np.array([]))
    logits = torch.tensor([[1.0, 5.0, 2.0], [0.0, 0.0, -1.0]])
    assert logit_margin(logits).tolist() == [3.0, 0.0]


def test_detectors_compared_at_one_false_positive_rate():
    """``--matched-fpr``: every detector thresholded anew on its own held-out clean scores, at most that
    share flagged (ties not), then each attack's successful adversarials counted at that threshold."""
    from training.robustness import matched_detection, side_by_side

    clean = np.arange(100, dtype=float)  # the top 5 (95..99) may be flagged, 94 may not
    evaluation = {"clean": {"scores_correct": clean.tolist()},
                  "attacks": [{"label": "a", "scores": [94.0, 95.0, 99.5, 10.0]}, {"label": "b", "scores": []}],
                  "shifts": [{"name": "JPEG q50", "scores": [96.0, 3.0]}]}
    fpr, detected = matched_detection(evaluation, 0.05)
    assert fpr == 0.05 and detected == {"a": 0.5, "b": None, "JPEG q50": 0.5}
    assert matched_detection(evaluation, 0.0)[1]["a"] == 0.25  # nothing clean flagged: only above 99
    shifted = {**evaluation, "clean": {"scores_correct": (clean + 1000).tolist()}}
    assert matched_detection(shifted, 0.05)[1]["a"] == 0.0  # its own clean scores set its threshold
    full = {"clean": {"accuracy": 1.0, "false_positives_correct": {"rate": 0.1}, **evaluation["clean"]},
            "attacks": [{**a, "kind": "budget", "accuracy_under_attack": 0.0, "detection": {"rate": 0.9},
                         "evasion": {"rate": 0.1}, "auroc": 0.9} for a in evaluation["attacks"]], "_report": {},
            "shifts": [{**evaluation["shifts"][0], "flagged": {"rate": 0.5}, "accuracy": 0.5}]}
    table = side_by_side({"x": full, "y": {**full, "clean": {**full["clean"], **shifted["clean"]}}}, 0.05)
    assert "| a | 50.0% | 0.0% |" in table and "| clean flagged (correct images) | 5.0% | 5.0% |" in table
    assert "| JPEG q50 (flagged) | 50.0% | 0.0% |" in table  # 96 is above x's threshold, not y's (1000 up)
    # The matched table comes last, after every table at each detector's own threshold.
    assert table.index("Thresholded anew") > table.index("| natural shift |")


def test_detector_evaluate_command(default_bundle, tmp_path, capsys):
    from training.evaluate import main

    out = tmp_path / "ev"
    assert main(["--bundle", str(default_bundle), "--suite", "quick", "--max-images", "80", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| attack |" in printed and "natural shift" in printed
    ev = json.loads((out / "evaluation.json").read_text())
    split = json.loads((default_bundle / "split.json").read_text())
    assert len(ev["image_ids"]["evaluated"]) == 80
    assert ev["bundle"]["path"] == str(default_bundle.resolve())  # found again from any working folder
    from training.report import evaluation_markdown

    at_zero = "\n".join(evaluation_markdown(dict(ev, detector=dict(ev["detector"], target_fpr=0.0))))
    assert "(set for 0" in at_zero and "(fixed)" not in at_zero  # 0 is a target, not "no target"
    assert "warning" not in capsys.readouterr().err
    assert not set(ev["image_ids"]["evaluated"]) & (set(split["fit"]) | set(split["calibration"]))
    # The held-out draw keeps the classifier's own share of mistakes (the fitted images are all correct).
    from training.classifier import predict

    test = load_dataset("digits", train=False)
    correct = (predict(load_bundle(default_bundle).model, test, batch_size=256) == test.labels).numpy()
    excluded = np.union1d(split["fit"], split["calibration"])
    assert ev["image_ids"]["evaluated"] == held_out_images(correct, excluded, 80, np.random.default_rng(0)).tolist()
    assert [a["label"] for a in ev["attacks"]] == [e.label for e in attack_suite(0.2, 64, "quick")]
    for png in ("evaluation_detection.png", "evaluation_roc.png", "evaluation_scores.png", "evaluation_budget.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "Clean false positives" in (out / "evaluation.md").read_text()
    assert "Evasion budget" in (out / "evaluation.md").read_text()
    assert "| PGD-10 L∞ 8/255 (seen in fitting) |" in (out / "evaluation.md").read_text()
    assert ev["evasion_budget"]["groups"]["all attacks"]["linf"]["n"] == ev["attacks"][0]["n_attacked"]
    with pytest.raises(SystemExit):
        main(["--bundle", str(tmp_path / "missing"), "--no-progress"])
    # More images asked for than the split leaves: all of them (with the split's share of mistakes), and a warning.
    capsys.readouterr()
    assert main(["--bundle", str(default_bundle), "--suite", "quick", "--max-images", "5000", "--out",
                 str(tmp_path / "all"), "--no-progress"]) == 0
    drawn = json.loads((tmp_path / "all" / "evaluation.json").read_text())["image_ids"]["evaluated"]
    assert drawn == held_out_images(correct, excluded, 5000, np.random.default_rng(0)).tolist()
    assert f"warning: {len(drawn)} held-out images, not 5000" in capsys.readouterr().err
    # Another dataset of the same image shape is not the one the detector was fitted on.
    small = tmp_path / "small"
    small.mkdir()
    test = load_dataset("digits", train=False)
    for split in ("train", "test"):
        np.savez(small / f"d_{split}.npz", x=test.images[:60, 0].numpy(), y=test.labels[:60].numpy())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", f"npz:{small}", "--max-images", "40", "--no-progress",
              "--out", str(tmp_path / "wrong")])
    assert stop.value.code == 2 and "not the dataset the detector was fitted on" in capsys.readouterr().err
    # Two evaluations side by side (the same one twice here): a table and the budget plot.
    from training.robustness import main as side_by_side

    assert side_by_side([str(out), str(out / "evaluation.json"), "--names", "a", "b",
                         "--out", str(tmp_path / "budget.png")]) == 0
    table = capsys.readouterr().out
    assert "| | a | b |" in table and "evasion budget L∞, all attacks" in table
    assert table.count("| PGD-10 L∞ 8/255 | budget |") == 1
    rows = {}  # each attack's first row: the per-attack table (the landing table follows it)
    for line in table.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0][2:], line)
    assert "held-out images drawn with | the split's share of mistakes | the split's share of mistakes |" in table
    assert "drew their held-out images differently" not in table
    assert table.count("| PGD-10 L∞ 8/255 |") == 2 and "median landing margin / beyond clean" in table
    assert rows["FGSM L∞ 8/255"].count("(seen in fitting)") == 2  # both columns: the same bundle
    assert "seen" not in rows["PGD L∞ 8/255, stopped at first misclassification"]
    assert table.count("| JPEG q50 |") == 1 and "a: flagged / accuracy" in table
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"
    other = dict(ev, attacks=ev["attacks"][:2])  # an older, shorter suite: its missing attacks read "–"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert side_by_side([str(out), str(tmp_path / "other.json"), "--names", "a", "b"]) == 0
    table = capsys.readouterr().out
    assert table.count("– (not in its suite)") == len(ev["attacks"]) - 2
    older = {k: v for k, v in ev.items() if k != "held_out_draw"}  # written before the draw was recorded
    older["clean"] = {k: v for k, v in ev["clean"].items() if "margin" not in k}
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert side_by_side([str(out), str(tmp_path / "older.json"), "--names", "a", "b"]) == 0
    table = capsys.readouterr().out
    assert "drew their held-out images differently" in table and "not recorded (older evaluations drew uniformly" in table
    assert "median landing margin" not in table  # one of them has no margins
    disjoint = dict(ev, attacks=[dict(a, label="another " + a["label"]) for a in ev["attacks"]])
    (tmp_path / "disjoint.json").write_text(json.dumps(disjoint))
    with pytest.raises(SystemExit) as stop:
        side_by_side([str(out), str(tmp_path / "disjoint.json")])
    assert stop.value.code == 2 and "share no attack" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")  # a file cut short: named, not a traceback
    with pytest.raises(SystemExit) as stop:
        side_by_side([str(out), str(tmp_path / "broken.json")])
    assert stop.value.code == 2 and "broken.json is not JSON" in capsys.readouterr().err


def test_detector_evaluate_shifts_suite_measures_false_alarms_without_attacks(default_bundle, tmp_path, capsys):
    """``--suite shifts``: clean false positives and natural shifts on many images for forward passes only; no
    attack, no per-attack plot (nor one of an earlier evaluation written to the same folder), and never
    attached in place of a bundle's coverage."""
    import shutil

    from detector import verify_bundle
    from training.evaluate import attach_evaluation, main
    from training.options import PipelineError
    from training.robustness import main as side_by_side

    assert attack_suite(level="shifts") == []
    with pytest.raises(ValueError, match="quick, full, shifts"):
        attack_suite(level="none")
    out = tmp_path / "ev"
    assert main(["--bundle", str(default_bundle), "--suite", "quick", "--max-images", "40", "--out", str(out),
                 "--no-progress"]) == 0
    assert (out / "evaluation_roc.png").is_file()
    capsys.readouterr()
    assert main(["--bundle", str(default_bundle), "--suite", "shifts", "--max-images", "120", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["suite"] == "shifts" and ev["attacks"] == [] and len(ev["image_ids"]["evaluated"]) == 120
    assert ev["detector"]["name"] == "activations"  # the bundle's --detector, named beside what it reads
    assert [s["name"] for s in ev["shifts"]] == list(SHIFTS) and ev["clean"]["false_positives_correct"]["n"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.md"]
    md = (out / "evaluation.md").read_text()
    assert "No attack was run" in md and "| attack |" not in md and "| natural shift |" in md and ".png" not in md
    assert "Clean false positives" in printed and "plots" not in printed
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle, bundle)
    bundle_hash = verify_bundle(bundle)
    with pytest.raises(SystemExit):
        main(["--bundle", str(bundle), "--suite", "shifts", "--max-images", "40", "--attach",
              "--out", str(tmp_path / "again"), "--no-progress"])
    assert "not attached" in capsys.readouterr().err and not (tmp_path / "again").exists()
    with pytest.raises(PipelineError, match="not attached"):
        attach_evaluation(bundle, dict(ev, bundle={"sha256": bundle_hash}))
    assert verify_bundle(bundle) == bundle_hash
    with pytest.raises(SystemExit):
        main(["--bundle", str(bundle), "--suite", "shifts", "--eps", "0.1", "--no-progress"])
    assert "runs no attack" in capsys.readouterr().err
    # Without --out: beside the bundle, under the suite's own name, never over the full suite's folder.
    assert main(["--bundle", str(bundle), "--suite", "shifts", "--max-images", "40", "--no-progress"]) == 0
    assert (tmp_path / "bundle-evaluation-shifts" / "evaluation.json").is_file()
    assert not (tmp_path / "bundle-evaluation").exists()
    # Two of them side by side: clean and shifts, no attack table.
    assert side_by_side([str(out), str(out), "--names", "a", "b", "--matched-fpr", "0.05"]) == 0
    table = capsys.readouterr().out
    assert "| clean flagged (correct images) |" in table and "| JPEG q50 |" in table and "| attack |" not in table
    with pytest.raises(SystemExit) as stop:  # no attack, no budget: no empty plot
        side_by_side([str(out), str(out), "--names", "a", "b", "--out", str(tmp_path / "budget.png")])
    assert stop.value.code == 2 and "nothing to plot" in capsys.readouterr().err
    assert not (tmp_path / "budget.png").exists()
    # --shifts: any change --clean-variants takes, those the detector was fitted on marked; or none at all
    mine = tmp_path / "mine"
    assert main(["--bundle", str(default_bundle), "--suite", "shifts", "--shifts", "jpeg q60, noise sigma=0.03",
                 "--max-images", "60", "--out", str(mine), "--no-progress"]) == 0
    ev = json.loads((mine / "evaluation.json").read_text())
    assert [s["name"] for s in ev["shifts"]] == ["JPEG q60", "noise σ=0.03"]
    md = (mine / "evaluation.md").read_text()
    assert "| JPEG q60 (seen in fitting) |" in md and "| noise σ=0.03 (seen in fitting) |" in md
    assert main(["--bundle", str(default_bundle), "--suite", "shifts", "--shifts", "none", "--max-images", "60",
                 "--out", str(mine), "--no-progress"]) == 0
    assert json.loads((mine / "evaluation.json").read_text())["shifts"] == []
    assert "| natural shift |" not in (mine / "evaluation.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--bundle", str(default_bundle), "--shifts", "sharpen", "--out", str(mine), "--no-progress"])
    assert "unknown shift 'sharpen'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--bundle", str(default_bundle), "--shifts", "none,JPEG q30", "--out", str(mine), "--no-progress"])
    assert "'none' stands alone" in capsys.readouterr().err


def test_detector_evaluate_attach_puts_the_evaluation_in_the_bundle(default_bundle, tmp_path, capsys):
    import shutil

    from detector import BundleError, verify_bundle
    from training.evaluate import attach_evaluation, main
    from training.options import PipelineError

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle, bundle)
    before = verify_bundle(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    out = tmp_path / "ev"
    assert main(["--bundle", str(bundle), "--suite", "quick", "--max-images", "40", "--out", str(out),
                 "--no-progress", "--attach"]) == 0
    printed = capsys.readouterr().out
    after = verify_bundle(bundle)
    assert after != before and printed.rstrip().endswith(after)
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["bundle"]["sha256"] == before
    assert json.loads((bundle / "evaluation.json").read_text())["image_ids"] == ev["image_ids"]
    assert json.loads((bundle / "split.json").read_text())["evaluated"] == ev["image_ids"]["evaluated"]
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    assert all(files[name] == manifest[name] for name in ("config.json", "weights.pt", "detector.skops"))
    # What /model serves as the coverage: this evaluation, not the one detector-train ran.
    served = load_bundle(bundle).report["evaluation"]
    assert served["n_evaluated"] == 40 and served["suite"] == "quick"
    assert "--attach" in load_bundle(bundle).report["evaluation_command"] and "command" not in served
    assert [a["detection"] for a in served["attacks"]] == [a["detection"] for a in ev["attacks"]]
    assert "run by `detector-evaluate --bundle" in (bundle / "report.md").read_text()
    assert "Command: `detector-evaluate --bundle" in (bundle / "evaluation.md").read_text()
    # An evaluation of the bundle as it was before is not attached to what it has become.
    with pytest.raises(BundleError, match="not the pinned one"):
        attach_evaluation(bundle, ev)
    assert verify_bundle(bundle) == after
    # An evaluation already written is attached without running it again, to the bundle it judged.
    from training.bundle_tool import main as bundle_tool

    twin = tmp_path / "twin"
    shutil.copytree(default_bundle, twin)
    capsys.readouterr()
    assert bundle_tool(["attach-evaluation", str(twin), str(out)]) == 0
    assert capsys.readouterr().out.strip() == verify_bundle(twin) == after  # the same files as --attach wrote
    assert bundle_tool(["attach-evaluation", str(bundle), str(out / "evaluation.json")]) == 1
    assert "not the pinned one" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"attacks": []}))
    assert bundle_tool(["attach-evaluation", str(twin), str(tmp_path / "other.json")]) == 1
    assert "not an evaluation detector-evaluate wrote" in capsys.readouterr().err
    assert verify_bundle(twin) == after
    # Of the evaluation it replaces, no file is left; one of another dataset is not the bundle's coverage.
    attach_evaluation(twin, dict(ev, bundle={"sha256": after}, evasion_budget={}))
    report = load_bundle(twin).report
    assert not (twin / "evaluation_budget.png").exists() and "evaluation_budget" not in report["files"]
    with pytest.raises(PipelineError, match="the bundle was fitted on digits"):
        attach_evaluation(twin, dict(ev, bundle={"sha256": verify_bundle(twin)}, data={"spec": "cifar10"}))
    # Other shifts than the suite's own list (none, or only those it was fitted on) are not its coverage.
    for shifts in ([], ev["shifts"][:1]):
        with pytest.raises(PipelineError, match="other natural shifts"):
            attach_evaluation(twin, dict(ev, bundle={"sha256": verify_bundle(twin)}, shifts=shifts))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--bundle", str(twin), "--suite", "quick", "--shifts", "JPEG q60", "--attach", "--no-progress"])
    assert "other natural shifts" in capsys.readouterr().err
    assert not (tmp_path / "twin-evaluation-quick").exists()
    # A bundle's report names the files its evaluation replaces; a crafted one cannot name a file outside it.
    from detector import update_bundle

    outside = [tmp_path / "victim.txt", tmp_path / "absolute.txt"]
    for file in outside:
        file.write_text("keep me")

    def craft(stage):
        report = json.loads((stage / "report.json").read_text())
        report["files"].update(evaluation_up="../victim.txt", evaluation_abs=str(outside[1]), evaluation_odd=3)
        (stage / "report.json").write_text(json.dumps(report))

    update_bundle(twin, craft)
    attach_evaluation(twin, dict(ev, bundle={"sha256": verify_bundle(twin)}))
    assert all(file.read_text() == "keep me" for file in outside)
    files = load_bundle(twin).report["files"]
    assert not {"evaluation_up", "evaluation_abs", "evaluation_odd"} & set(files) and "evaluation" in files


def test_detector_evaluate_refuses_a_split_that_has_changed_since_fitting(default_bundle, tmp_path, capsys):
    """split.json names positions in the test split: if the split has another size now (files added to a
    folder:), those positions name other images, and held-out would no longer mean held out."""
    import shutil

    from detector import update_bundle
    from training.evaluate import main

    bundle = tmp_path / "b"
    shutil.copytree(default_bundle, bundle)

    def grow(stage):
        report = json.loads((stage / "report.json").read_text())
        report["data"]["n_test"] += 7
        (stage / "report.json").write_text(json.dumps(report))

    update_bundle(bundle, grow)
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(bundle), "--suite", "shifts", "--max-images", "40", "--no-progress"])
    assert stop.value.code == 2 and "no longer name the images" in capsys.readouterr().err


def test_side_by_side_finds_the_bundle_of_an_evaluation_from_another_folder(default_bundle, tmp_path, monkeypatch):
    """An evaluation that names its bundle relative to where detector-evaluate ran is read from elsewhere:
    the bundle beside the evaluation folder (where detector-evaluate puts it) is found."""
    import shutil

    from training.robustness import load

    shutil.copytree(default_bundle, tmp_path / "runs" / "b")
    (tmp_path / "runs" / "b-evaluation").mkdir()
    (tmp_path / "runs" / "b-evaluation" / "evaluation.json").write_text(
        json.dumps({"bundle": {"path": "runs/b", "sha256": "0" * 64}}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load(tmp_path / "runs" / "b-evaluation")["_report"]["options"]["data"] == "digits"
