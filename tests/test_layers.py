"""Earlier layers' class-conditional statistics, read by hooks in the same forward pass."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from detector import analyze, fgsm, pgd
from detector.features import detector_features
from detector.layers import (
    EVERY_CONV,
    GRAM_MAX_CHANNELS,
    LayerGaussians,
    feature_rows,
    forward_probed,
    gram_layers,
    probe_layers,
)
from detector.models import WideResNet


def test_probes_are_spread_over_the_depth(digits_model):
    convs = [n for n, m in digits_model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert probe_layers(digits_model, 3) == convs[1:]  # at 2/3 and 3/3 of the depth
    assert probe_layers(digits_model, 1) == convs[-1:]
    deep = nn.Sequential(*[nn.Conv2d(1, 1, 1) for _ in range(28)])
    assert probe_layers(deep, 3) == ["9", "18", "27"]
    assert probe_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 3) == []
    # a residual network: the last conv of each group (shortcut convs count towards the depth)
    assert probe_layers(WideResNet(depth=16, width=2), 3) == ["blocks.1.conv2", "blocks.3.conv2", "blocks.5.conv2"]
    assert probe_layers(digits_model, EVERY_CONV) == convs
    assert probe_layers(deep, EVERY_CONV) == [str(i) for i in range(28)]


def test_probed_pass_is_the_plain_pass(digits_model, digits_test):
    x, _ = digits_test.batch(slice(0, 16))
    probes = probe_layers(digits_model)
    logits, phi, acts = forward_probed(digits_model, x, probes)
    plain = analyze(digits_model, x)
    torch.testing.assert_close(logits, plain.logits)
    torch.testing.assert_close(phi, plain.phi)
    # channel means of each probed layer's output
    assert [a.shape for a in acts] == [(16, digits_model.get_submodule(n).out_channels) for n in probes]
    for unknown in (["no.such.layer"], [probes[0], "no.such.layer"]):  # a known name first: its hook must go too
        with pytest.raises(AttributeError):
            forward_probed(digits_model, x, unknown)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in digits_model.modules())


@pytest.fixture(scope="module")
def gaussians(digits_model, digits_train):
    x, y = digits_train.batch(slice(None))
    return LayerGaussians(probe_layers(digits_model)).fit(digits_model, x, y)


def test_fitting_reads_the_model_in_eval_mode_and_restores_its_mode(digits_model, digits_train, gaussians):
    x, y = digits_train.batch(slice(None))
    digits_model.train()
    try:
        refit = LayerGaussians(probe_layers(digits_model)).fit(digits_model, x, y)
        assert digits_model.training
    finally:
        digits_model.eval()
    for a, b in zip(refit.means_, gaussians.means_):
        torch.testing.assert_close(a, b)


def test_clean_images_sit_near_their_class_and_adversarials_far(digits_model, digits_test, gaussians):
    x, y = digits_test.batch(slice(0, 200))
    logits, phi, acts = forward_probed(digits_model, x, gaussians.probes)
    clean = gaussians.distances(acts, phi, logits.argmax(1)).detach()
    x_adv = pgd(digits_model, x, y, eps=0.2, alpha=0.05, steps=10)
    logits, phi, acts = forward_probed(digits_model, x_adv, gaussians.probes)
    adv = gaussians.distances(acts, phi, logits.argmax(1)).detach()
    assert clean.shape == adv.shape == (200, len(gaussians.probes) + 1)
    # every layer, median over inputs: the adversarials are further from their (wrong) class
    assert (adv.median(dim=0).values > clean.median(dim=0).values).all()
    # the nearest class mean is never further than the predicted class's
    logits, phi, acts = forward_probed(digits_model, x, gaussians.probes)
    nearest = gaussians.distances(acts, phi, None).detach()
    assert (nearest <= gaussians.distances(acts, phi, logits.argmax(1)).detach() + 1e-5).all()  # float32 sums
    assert [m.shape[0] for m in gaussians.means_] == [10] * (len(gaussians.probes) + 1)
    # a class's own mean is at distance zero
    means = [torch.as_tensor(m[3]).float()[None] for m in gaussians.means_]
    zero = gaussians.distances(means[:-1], means[-1], torch.tensor([3]))
    assert torch.allclose(zero, torch.zeros_like(zero), atol=1e-6)
    assert all(isinstance(m, np.ndarray) for m in gaussians.means_ + gaussians.precisions_)


def test_distances_to_the_predicted_class_are_each_layers_own_mahalanobis_distance_in_its_order():
    # Widths that interleave (3, 5, 3, 5, 4) and repeat: the vectors of one width are scored together,
    # and each distance must come back in its own layer's column.
    gen = np.random.default_rng(0)
    widths, k, n = [3, 5, 3, 5, 4], 6, 9
    stats = LayerGaussians([f"conv{i}" for i in range(len(widths) - 1)])
    stats.means_ = [gen.normal(size=(k, d)) for d in widths]
    stats.precisions_ = []
    for d in widths:
        a = gen.normal(size=(d, d))
        stats.precisions_.append(a @ a.T + d * np.eye(d))
    vectors = [gen.normal(size=(n, d)) for d in widths]
    predicted = gen.integers(0, k, size=n)
    expected = np.stack([np.log1p(np.einsum("nd,de,ne->n", v - m[predicted], p, v - m[predicted]))
                         for v, m, p in zip(vectors, stats.means_, stats.precisions_, strict=True)], axis=1)
    as_tensors = [torch.as_tensor(v, dtype=torch.float64) for v in vectors]
    got = stats.distances(as_tensors[:-1], as_tensors[-1], torch.as_tensor(predicted))
    assert got.shape == (n, len(widths))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # float32 vectors are scored in float32, to the same figures within its rounding, also when the
    # model ran under autocast (which would take the products in bfloat16: ~1e-2 apart)
    as32 = [v.float() for v in as_tensors]
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got32 = stats.distances(as32[:-1], as32[-1], torch.as_tensor(predicted))
            factored, _ = stats._predicted_and_gap(as32[:-1], as32[-1], torch.as_tensor(predicted))
        assert got32.dtype == factored.dtype == torch.float32
        np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(factored.numpy(), expected, rtol=1e-4)  # the agreement's Cholesky route


def test_distances_cost_the_same_operations_however_many_layers_share_a_width():
    # On an accelerator each operation is a kernel launch: layers of one width are scored together.
    from benchmarks.common import count_operations

    def operations(layers: int) -> int:
        stats = LayerGaussians([f"conv{i}" for i in range(layers - 1)])
        stats.means_ = [np.zeros((10, 8))] * layers
        stats.precisions_ = [np.eye(8)] * layers
        vectors, predicted = [torch.rand(32, 8) for _ in range(layers)], torch.zeros(32, dtype=torch.long)
        stats.distances(vectors[:-1], vectors[-1], predicted)  # the statistics' tensors are built once
        return count_operations(lambda: stats.distances(vectors[:-1], vectors[-1], predicted))

    assert operations(30) == operations(2)


def test_feature_rows_append_the_distances_and_grad_changes_nothing(digits_model, digits_test, gaussians):
    x, _ = digits_test.batch(slice(0, 16))
    weight_norm = float(digits_model.net.fc.weight.detach().norm())
    rows, out = feature_rows(digits_model, x, feature_set="curvature", weight_norm=weight_norm,
                             gaussians=gaussians)
    base = detector_features("curvature", out.logits, out.phi_sq, weight_norm)
    assert rows.shape == (16, base.shape[1] + len(gaussians.probes) + 1)
    torch.testing.assert_close(rows[:, : base.shape[1]], base)
    x = x.clone().requires_grad_(True)
    with_grad, _ = feature_rows(digits_model, x, feature_set="curvature", weight_norm=weight_norm,
                                gaussians=gaussians, grad=True)
    torch.testing.assert_close(with_grad.detach(), rows)
    (grad,) = torch.autograd.grad(with_grad[:, -1].sum(), x)
    assert grad.abs().sum() > 0  # an adaptive attack can follow the earlier layers


def test_rows_with_means_append_each_layers_channel_means(digits_model, digits_test, gaussians):
    x, _ = digits_test.batch(slice(0, 16))
    with_means = LayerGaussians(gaussians.probes, with_means=True)
    with_means.means_, with_means.precisions_ = gaussians.means_, gaussians.precisions_
    logits, phi, acts = forward_probed(digits_model, x, gaussians.probes)
    predicted = logits.argmax(1)
    rows = with_means.rows(acts, phi, predicted).detach()
    widths = [a.shape[1] for a in acts] + [phi.shape[1]]
    assert rows.shape == (16, with_means.n_features) == (16, len(widths) + sum(widths))
    torch.testing.assert_close(rows[:, : len(widths)], gaussians.distances(acts, phi, predicted).detach())
    torch.testing.assert_close(rows[:, len(widths):], torch.cat([*acts, phi], dim=1).to(rows.dtype))
    # statistics saved before the option existed give the distances only
    old = copy.copy(gaussians)
    del old.with_means
    assert old.n_features == len(widths)
    assert old.rows(acts, phi, predicted).shape == (16, len(widths))


def test_agreement_is_the_gap_to_the_nearest_class(digits_model, digits_test, gaussians):
    """The agreement gap: log(1 + d²) to the predicted class minus to the nearest one, per layer;
    computed from one set of distances to every class (through the precision's Cholesky factor), it
    must equal the two distances taken apart."""
    x, y = digits_test.batch(slice(0, 200))
    x_adv = pgd(digits_model, x, y, eps=0.2, alpha=0.05, steps=10)
    both = LayerGaussians(gaussians.probes, with_means=True, with_agreement=True)
    both.means_, both.precisions_ = gaussians.means_, gaussians.precisions_
    n = len(gaussians.probes) + 1
    gaps = {}
    for name, images in (("clean", x), ("adversarial", x_adv)):
        logits, phi, acts = forward_probed(digits_model, images, gaussians.probes)
        predicted = logits.argmax(1)
        gap = gaussians.agreement(acts, phi, predicted).detach()
        expected = (gaussians.distances(acts, phi, predicted) - gaussians.distances(acts, phi, None)).detach()
        torch.testing.assert_close(gap, expected.clamp_min(0), atol=1e-4, rtol=1e-4)
        assert gap.shape == (200, n) and (gap >= 0).all()
        rows = both.rows(acts, phi, predicted).detach()
        assert rows.shape == (200, both.n_features) == (200, 2 * n + sum(a.shape[1] for a in [*acts, phi]))
        torch.testing.assert_close(rows[:, :n], gaussians.distances(acts, phi, predicted).detach(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rows[:, n:2 * n], gap)
        torch.testing.assert_close(rows[:, 2 * n:], torch.cat([*acts, phi], dim=1).to(rows.dtype))
        gaps[name] = gap
    # Clean images: the earlier layers agree with the output (measured: some layer disagrees on 4.5%);
    # PGD adversarials: the first probe still points elsewhere on 46%, some layer on 57%.
    assert (gaps["clean"] > 0).any(dim=1).float().mean() < 0.1
    assert (gaps["adversarial"] > 0).any(dim=1).float().mean() > 0.4
    # A class no reference image stood for (a row of zeros) is never the nearest one.
    logits, phi, acts = forward_probed(digits_model, x[:16], gaussians.probes)
    predicted = logits.argmax(1)
    missing = copy.copy(gaussians)
    missing.means_ = [m.copy() for m in gaussians.means_]
    lost = (int(predicted[0]) + 1) % 10
    for m in missing.means_:
        m[lost] = 0.0
    origin = [torch.zeros_like(a[:1]) for a in acts], torch.zeros_like(phi[:1])
    assert (missing.agreement(*origin, predicted[:1]) > 0).all()  # nearest is a fitted class, not the zero row
    # Statistics saved before the option existed give no gaps.
    old = copy.copy(both)
    del old.with_agreement
    assert old.n_features == n + sum(a.shape[1] for a in [*acts, phi])


def test_default_bundle_is_the_activations_detector(default_bundle):
    """The default bundle's detector (the activations rows, a logistic regression) loaded from its skops
    file: rows as wide as its fit, its operating point holding on held-out clean images, PGD caught."""
    from detector import load_bundle
    from detector.datasets import load_dataset

    bundle = load_bundle(default_bundle)
    assert bundle.detector.probe_means and bundle.detector.layer_gaussians.with_means
    assert type(bundle.detector.estimator_).__name__ == "Pipeline"
    split = json.loads((default_bundle / "split.json").read_text())
    seen = set(split["fit"]) | set(split["calibration"])
    test = load_dataset("digits", train=False)
    held = torch.tensor([i for i in range(len(test)) if i not in seen])
    assert len(held) > 100
    x, y = test.batch(held)
    clean = bundle.detect(x)
    assert clean.features.shape[1] == bundle.detector.n_features_in_
    correct = clean.labels == y.numpy()
    assert correct.mean() > 0.9 and clean.adversarial[correct].mean() <= 0.12
    x_adv = pgd(bundle.model, x[correct], y[correct], eps=0.2, alpha=0.05, steps=10)
    adv = bundle.detect(x_adv)
    fooled = adv.labels != y[correct].numpy()
    assert fooled.mean() > 0.8 and adv.adversarial[fooled].mean() >= 0.8


def test_layers_detector_and_statistics_saved_before_channel_means(layers_bundle):
    """The layers detector (boosted trees on distances); then that detector as one
    saved before ``with_means``/``probe_means`` existed, through skops: it loads, prints and scores
    the same rows."""
    import skops.io as sio

    from detector import load_bundle
    from detector.bundle import TRUSTED_TYPES
    from detector.datasets import load_dataset

    bundle = load_bundle(layers_bundle)
    det = bundle.detector
    assert not det.probe_means and not det.layer_gaussians.with_means and det.gradient == "smoothed"
    x, _ = load_dataset("digits", train=False).batch(slice(0, 32))
    answer = bundle.detect(x)
    assert det.layer_gaussians.n_features == len(det.layer_gaussians.probes) + 1  # distances only
    assert answer.features.shape[1] == det.n_features_in_
    del det.probe_means, det.layer_gaussians.with_means
    old = sio.loads(sio.dumps(det), trusted=list(TRUSTED_TYPES))
    assert "probe_means" not in vars(old) and "with_means" not in vars(old.layer_gaussians)
    assert "UncannyValleyDetector" in repr(old)  # get_params reads the class default
    rows, _ = bundle.features(x)
    np.testing.assert_array_equal(old.score_samples(rows), answer.adversarial_score)


def test_agreement_detector_round_trips_through_its_bundle(default_bundle, tmp_path):
    """``--detector agreement`` on the default classifier: the bundle loads through skops, its rows
    carry the agreement gaps, and its score has a gradient (what an adaptive attacker descends)."""
    from detector import load_bundle
    from detector.datasets import load_dataset
    from training.pipeline import TrainOptions, run

    out = tmp_path / "agreement"
    run(TrainOptions(detector="agreement", weights=str(default_bundle / "weights.pt"), evaluate="none",
                     out=str(out), progress=False))
    bundle = load_bundle(out)
    det, stats = bundle.detector, bundle.detector.layer_gaussians
    assert det.probe_agreement and stats.with_agreement and stats.with_means and det.gradient == "exact"
    x, _ = load_dataset("digits", train=False).batch(slice(0, 32))
    answer = bundle.detect(x)
    n = len(stats.probes) + 1
    assert answer.features.shape[1] == det.n_features_in_
    assert stats.n_features == 2 * n + sum(m.shape[1] for m in stats.means_)
    logits, phi, acts = forward_probed(bundle.model, x, stats.probes)
    start = det.n_features_in_ - stats.n_features + n  # output-layer features, distances, then the gaps
    gaps = answer.features[:, start:start + n]
    np.testing.assert_allclose(gaps, stats.agreement(acts, phi, logits.argmax(1)).detach().numpy(), atol=1e-5)
    rows, _ = bundle.features_with_grad(x.clone().requires_grad_(True))
    assert rows.requires_grad and torch.isfinite(det.decision_tensor(rows)).all()


def test_gram_layers_are_the_stem_and_the_first_probe_when_narrow(digits_model):
    convs = [n for n, m in digits_model.named_modules() if isinstance(m, nn.Conv2d)]
    assert gram_layers(digits_model, probe_layers(digits_model)) == convs[:2]
    narrow = WideResNet(depth=16, width=2)
    assert gram_layers(narrow, probe_layers(narrow)) == ["conv1", "blocks.1.conv2"]
    with torch.device("meta"):  # a WRN-28-10's first group has 160 channels: its Gram matrix is not read
        wide = WideResNet(depth=28, width=10)
    assert wide.get_submodule(probe_layers(wide)[0]).out_channels > GRAM_MAX_CHANNELS
    assert gram_layers(wide, probe_layers(wide)) == ["conv1"]
    assert gram_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), []) == []


def _probed_and_outputs(model, x, watched, probes, **options):
    """:func:`forward_probed` on ``probes``, and a copy of the whole output of each ``watched`` layer in
    that pass (copied: a later in-place ReLU may overwrite it)."""
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: seen.__setitem__(n, out.detach().clone())) for n in watched]
    try:
        return forward_probed(model, x, probes, **options), seen
    finally:
        for h in handles:
            h.remove()


def test_gram_vectors_are_the_upper_triangle_of_the_channel_co_activations(digits_model, digits_test):
    x, _ = digits_test.batch(slice(0, 16))
    probes = probe_layers(digits_model)
    grams = gram_layers(digits_model, probes)
    (logits, phi, acts), seen = _probed_and_outputs(digits_model, x, grams, probes, gram_probes=grams)
    torch.testing.assert_close(logits, analyze(digits_model, x).logits)
    assert len(acts) == len(probes) + len(grams)
    for name, vector in zip(grams, acts[len(probes):]):
        out = seen[name]
        c = out.shape[1]
        gram = torch.einsum("nchw,ndhw->ncd", out, out) / (out.shape[2] * out.shape[3])
        i, j = torch.triu_indices(c, c)
        assert vector.shape == (16, c * (c + 1) // 2)
        torch.testing.assert_close(vector, gram[:, i, j])
    # the probes' channel means are still the first vectors, in order
    torch.testing.assert_close(acts[0], forward_probed(digits_model, x, probes)[2][0])
    # in float32 even when the model runs in bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, low = forward_probed(digits_model, x, probes, gram_probes=grams)
    assert low[-1].dtype == torch.float32


def test_gram_distances_tell_one_step_attacks_from_clean_images(digits_model, digits_train, digits_test):
    """FGSM moves every pixel; the stem's Gram matrix sees the new texture (measured, medians over 200
    images: log distance of the stem's Gram vector 3.1 clean, 7.3 after FGSM at ε = 0.2; of the first
    probe's channel means 3.9 and 5.6)."""
    x_fit, y_fit = digits_train.batch(slice(None))
    probes = probe_layers(digits_model)
    stats = LayerGaussians(probes, gram_probes=gram_layers(digits_model, probes)).fit(digits_model, x_fit, y_fit)
    assert [m.shape[1] for m in stats.means_[len(probes):-1]] == [
        c * (c + 1) // 2 for c in (digits_model.get_submodule(n).out_channels for n in stats.gram_probes)]
    x, y = digits_test.batch(slice(0, 200))
    medians = {}
    for name, images in (("clean", x), ("fgsm", fgsm(digits_model, x, y, eps=0.2))):
        logits, phi, acts = stats.forward(digits_model, images)
        medians[name] = stats.distances(acts, phi, logits.argmax(1)).detach().median(dim=0).values
    stem = len(probes)  # the first Gram vector's column
    rise = medians["fgsm"] - medians["clean"]
    assert rise[stem] > 2.0 and rise[stem] > rise[0]


def test_gram_detector_round_trips_through_its_bundle_and_reads_no_other_layer(default_bundle, tmp_path,
                                                                              monkeypatch):
    """``--detector gram`` on the default classifier: the bundle records which Gram matrices it reads,
    loads, and detects with rows as wide as its classifier's; a bundle asking for the Gram matrix of
    another layer (its cost grows with the square of the channels) is refused."""
    import hashlib

    import skops.io as sio

    from detector import load_bundle
    from detector.bundle import BundleError
    from detector.datasets import load_dataset
    from training.pipeline import TrainOptions, run

    out = tmp_path / "gram"
    run(TrainOptions(detector="gram", weights=str(default_bundle / "weights.pt"), evaluate="none",
                     out=str(out), progress=False))
    bundle = load_bundle(out)
    det, stats = bundle.detector, bundle.detector.layer_gaussians
    assert det.probe_gram and det.reads()["probe_gram"] and stats.with_means
    assert stats.gram_probes == gram_layers(bundle.model, stats.probes) != []
    assert json.loads((out / "config.json").read_text())["detector"]["gram_probes"] == stats.gram_probes
    x, _ = load_dataset("digits", train=False).batch(slice(0, 32))
    answer = bundle.detect(x)
    assert answer.features.shape[1] == det.n_features_in_
    assert stats.n_features == len(stats.means_) + sum(m.shape[1] for m in stats.means_)
    assert "Gram matrices" in (out / "report.md").read_text()

    def refused(message, **changes):
        """Write the detector with its statistics changed, rehash it as an attacker would, and load."""
        tampered = copy.deepcopy(det)
        for name, value in changes.items():
            setattr(tampered.layer_gaussians, name, value(tampered.layer_gaussians))
        (out / "detector.skops").write_bytes(sio.dumps(tampered))
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["files"]["detector.skops"] = hashlib.sha256((out / "detector.skops").read_bytes()).hexdigest()
        (out / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=message):
            load_bundle(out)

    # the widest probe, which gram_layers never picks
    refused("reads the Gram matrices of", gram_probes=lambda s: [s.probes[-1]])
    # one Gram layer many times, its statistics shared (skops stores a shared array once): scoring would
    # copy the 2,080 × 2,080 precision once per entry
    n, g = len(stats.probes), len(stats.gram_probes)
    many = lambda s, k=50: s.gram_probes + [s.gram_probes[-1]] * k  # noqa: E731
    refused("reads the Gram matrices of", gram_probes=many,
            means_=lambda s: s.means_[:n + g] + [s.means_[n + g - 1]] * 50 + s.means_[-1:],
            precisions_=lambda s: s.precisions_[:n + g] + [s.precisions_[n + g - 1]] * 50 + s.precisions_[-1:])
    refused("probes a layer more than once", probes=lambda s: s.probes + s.probes[-1:])
    # the bound on what the statistics hold in all, below this honest detector's
    monkeypatch.setattr("detector.bundle.MAX_PRECISION_NUMBERS", sum(p.size for p in stats.precisions_) - 1)
    refused("hold more than")


def test_statistics_on_device_serve_inference_then_gradients_and_follow_a_refit(digits_model, digits_train,
                                                                                digits_test):
    """The statistics are turned into tensors once per dtype and device: the first use under inference
    mode (the service) must not leave tensors an attack cannot differentiate through, and fitting
    again must replace them."""
    x_fit, y_fit = digits_train.batch(slice(0, 300))
    x, _ = digits_test.batch(slice(0, 8))
    fresh = LayerGaussians(probe_layers(digits_model)).fit(digits_model, x_fit, y_fit)
    with torch.inference_mode():
        logits, phi, acts = forward_probed(digits_model, x, fresh.probes)
        served = fresh.distances(acts, phi, logits.argmax(1))
    x = x.clone().requires_grad_(True)
    logits, phi, acts = forward_probed(digits_model, x, fresh.probes)
    followed = fresh.distances(acts, phi, logits.argmax(1))
    (grad,) = torch.autograd.grad(followed.sum(), x)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(followed.detach(), served.clone())
    x_other, y_other = digits_train.batch(slice(300, 600))
    fresh.fit(digits_model, x_other, y_other)
    refitted = fresh.distances(acts, phi, logits.argmax(1)).detach()
    expected = LayerGaussians(fresh.probes).fit(digits_model, x_other, y_other).distances(acts, phi, logits.argmax(1))
    torch.testing.assert_close(refitted, expected.detach())
    assert not torch.allclose(refitted, followed.detach())
    fresh.means_ = [m + 1.0 for m in fresh.means_]  # replaced by hand: followed as well
    moved = fresh.distances(acts, phi, logits.argmax(1)).detach()
    assert not torch.allclose(moved, refitted)


def test_rectified_probes_are_the_channel_means_of_each_output_clipped_at_zero(digits_model, digits_test):
    x, _ = digits_test.batch(slice(0, 16))
    probes = probe_layers(digits_model, EVERY_CONV)
    (logits, phi, acts), seen = _probed_and_outputs(digits_model, x, probes, probes, rectified=True)
    torch.testing.assert_close(logits, analyze(digits_model, x).logits)
    plain = forward_probed(digits_model, x, probes)[2]
    for name, vector, mean in zip(probes, acts, plain):
        torch.testing.assert_close(vector, seen[name].clamp_min(0).mean(dim=(2, 3)))
        torch.testing.assert_close(mean, seen[name].mean(dim=(2, 3)))
        assert (vector >= mean).all() and not torch.allclose(vector, mean)  # the small CNN's convs go negative
    stats = LayerGaussians(probes, rectified=True)
    torch.testing.assert_close(stats.forward(digits_model, x)[2][0], acts[0])
    # under autocast the convs run in bfloat16; their means are still taken, and kept, in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (_, _, low), seen = _probed_and_outputs(digits_model, x, probes, probes, rectified=True)
    for name, vector in zip(probes, low):
        assert seen[name].dtype == torch.bfloat16 and vector.dtype == torch.float32
        torch.testing.assert_close(vector, seen[name].float().clamp_min(0).mean(dim=(2, 3)))


def test_rectified_means_taken_in_blocks_on_a_cpu_equal_the_whole_batch_at_once(digits_model, digits_test,
                                                                               monkeypatch):
    """On a CPU the clipped means are taken a few images at a time (to spare the memory a whole-batch
    temporary costs): blocks that do not divide the batch must give the whole batch's values and
    gradients, in order."""
    import detector.layers as layers

    x, _ = digits_test.batch(slice(0, 16))
    probes = probe_layers(digits_model, EVERY_CONV)
    x_whole = x.clone().requires_grad_(True)
    (_, _, whole), seen = _probed_and_outputs(digits_model, x_whole, probes, probes, rectified=True)
    (grad_whole,) = torch.autograd.grad(sum(a.square().sum() for a in whole), x_whole)
    largest = max(out[0].numel() for out in seen.values())
    monkeypatch.setattr(layers, "_CPU_BLOCK_ELEMENTS", 3 * largest)  # 3 images a block there: 16 = 5 × 3 + 1
    x_blocks = x.clone().requires_grad_(True)
    _, _, blocks = forward_probed(digits_model, x_blocks, probes, rectified=True)
    (grad_blocks,) = torch.autograd.grad(sum(a.square().sum() for a in blocks), x_blocks)
    for a, b in zip(whole, blocks, strict=True):
        torch.testing.assert_close(b, a)
    torch.testing.assert_close(grad_blocks, grad_whole)
    assert grad_whole.abs().sum() > 0


def test_every_layer_detector_reads_every_conv_rectified_through_its_bundle(default_bundle, tmp_path):
    """``--detector every-layer`` on the default classifier: its statistics cover every conv, read after
    max(0, ·), the loaded bundle scores with them (a bundle that forgot to rectify would score other
    rows), and the report says what it reads."""
    from detector import load_bundle
    from detector.datasets import load_dataset
    from training.pipeline import TrainOptions, run

    out = tmp_path / "every-layer"
    run(TrainOptions(detector="every-layer", weights=str(default_bundle / "weights.pt"), evaluate="none",
                     out=str(out), progress=False))
    bundle = load_bundle(out)
    det, stats = bundle.detector, bundle.detector.layer_gaussians
    convs = [n for n, m in bundle.model.named_modules() if isinstance(m, nn.Conv2d)]
    assert det.probe_rectified and det.reads()["probe_rectified"] and stats.rectified and stats.with_means
    assert stats.probes == convs
    assert json.loads((out / "config.json").read_text())["detector"]["rectified"] is True
    x, _ = load_dataset("digits", train=False).batch(slice(0, 32))
    answer = bundle.detect(x)
    assert answer.features.shape[1] == det.n_features_in_
    logits, phi, acts = forward_probed(bundle.model, x, stats.probes, rectified=True)
    expected = torch.cat([stats.distances(acts, phi, logits.argmax(1)), *acts, phi], dim=1)
    np.testing.assert_allclose(answer.features[:, -stats.n_features:], expected.detach().numpy(), rtol=1e-5, atol=1e-5)
    report = (out / "report.md").read_text()
    assert "every convolution" in report and "clipped at zero" in report
