"""Artifact bundles: exact round trip; hashes verified before anything is deserialised."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from detector import BundleError, InputSpec, UncannyValleyDetector, analyze, load_bundle, save_bundle


@pytest.fixture()
def bundle_dir(tmp_path, digits_model, digits_train):
    x, y = digits_train.batch(slice(0, 200))
    info = analyze(digits_model, x)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    detector = UncannyValleyDetector().fit(info.psi.numpy(), labels, kappa=info.sharpness.numpy())
    mean, std = digits_train.channel_stats()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "figure.png").write_bytes(b"\x89PNG not really")  # extra files are covered too
    return save_bundle(tmp_path / "b", model=digits_model, architecture="cnn", model_config={},
                       detector=detector, classes=digits_train.classes,
                       input_spec=InputSpec(1, 8, 8, mean, std), report={"detection": {"accuracy": 0.5}})


def test_round_trip_is_exact(bundle_dir, digits_model, digits_test):
    bundle = load_bundle(bundle_dir)
    original = digits_model.state_dict()
    loaded = bundle.model.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k].cpu(), loaded[k]) for k in original)
    x, _ = digits_test.batch(slice(0, 50))
    a, b = analyze(digits_model, x), analyze(bundle.model, x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.sharpness, b.sharpness)
    assert not bundle.model.training
    assert bundle.classes == [str(i) for i in range(10)]
    assert bundle.input_spec.channels == 1 and (bundle.input_spec.height, bundle.input_spec.width) == (8, 8)
    assert bundle.thresholds["valley"] == bundle.detector.valley_threshold_
    assert bundle.report == {"detection": {"accuracy": 0.5}}
    assert len(bundle.sha256) == 64
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "weights.pt", "detector.joblib", "report.json", "figure.png"}


@pytest.mark.parametrize("name", ["weights.pt", "detector.joblib", "config.json", "figure.png"])
def test_tampered_file_is_named_and_refused(bundle_dir, name):
    with open(bundle_dir / name, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", ["weights.pt", "detector.joblib", "manifest.json"])
def test_missing_file_is_named(bundle_dir, name):
    (bundle_dir / name).unlink()
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_bundle(bundle_dir)


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Exploit.marker),))


def test_a_substituted_pickle_is_never_opened(bundle_dir, tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    (bundle_dir / "detector.joblib").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(BundleError, match="detector.joblib"):
        load_bundle(bundle_dir)
    assert not marker.exists()


def test_manifest_cannot_point_outside(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"]["../escape"] = "0" * 64
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside"):
        load_bundle(bundle_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "absent")


def test_unfitted_detector_is_not_saved(tmp_path, digits_model):
    with pytest.raises(ValueError, match="fitted"):
        save_bundle(tmp_path, model=digits_model, architecture="cnn", detector=UncannyValleyDetector(),
                    classes=["a"], input_spec=InputSpec(1, 8, 8, [0.0], [1.0]))
