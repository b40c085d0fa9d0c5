"""Artifact bundles: exact round trip; hashes verified before anything is deserialised; nothing unpickled."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import numpy as np
import pytest
import torch

from detector import (
    BundleError,
    InputSpec,
    UncannyValleyDetector,
    analyze,
    load_bundle,
    save_bundle,
)


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
    assert set(manifest["files"]) == {"config.json", "weights.pt", "detector.skops", "report.json", "figure.png"}


@pytest.mark.parametrize("which", ["psi tree", "default"])
def test_detect_takes_the_bundles_own_images_only_and_reads_them_in_eval_mode(which, bundle_dir, default_bundle,
                                                                             digits_test):
    """What is not a batch of the images the bundle was fitted on is refused with what was wrong (it would
    be scored, meaninglessly); an empty batch has empty answers; a model left in train mode still answers
    as in eval mode, and neither its mode nor its batch-norm statistics change."""
    bundle = load_bundle(bundle_dir if which == "psi tree" else default_bundle)
    x, _ = digits_test.batch(slice(0, 16))
    for bad, error, match in (
            (x[0], ValueError, r"batch of images \[N, C, H, W\], got \(1, 8, 8\)"),
            (x.numpy(), ValueError, "got ndarray"),
            ((x * 255).to(torch.uint8), TypeError, "floating-point pixels"),
            (torch.nn.functional.interpolate(x, size=16), ValueError,
             r"1×8×8 \(the bundle's input spec\), got 1×16×16"),
            (x.expand(-1, 3, -1, -1), ValueError, "got 3×8×8"),
            (x * 255, ValueError, r"pixels in \[0, 1\], got values in \[0, 255\]"),
            (x.masked_fill(x > 0.5, float("inf")), ValueError, r"pixels in \[0, 1\]"),
            (x.masked_fill(x > 0.5, float("nan")), ValueError, r"pixels in \[0, 1\]")):
        with pytest.raises(error, match=match):
            bundle.detect(bad)
    empty = bundle.detect(x[:0])
    assert len(empty) == 0 and empty.probabilities.shape == (0, 10) and empty.adversarial.dtype == bool
    expected = bundle.detect(x)
    statistics = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    bundle.model.train()
    answer = bundle.detect(x)
    assert bundle.model.training, "the caller's mode is restored"
    assert all(torch.equal(statistics[k], v) for k, v in bundle.model.state_dict().items())
    np.testing.assert_array_equal(answer.adversarial_score, expected.adversarial_score)
    np.testing.assert_array_equal(answer.probabilities, expected.probabilities)


@pytest.mark.parametrize("name", ["weights.pt", "detector.skops", "config.json", "figure.png", "report.json"])
def test_tampered_file_is_named_and_refused(bundle_dir, name):
    with open(bundle_dir / name, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", ["weights.pt", "detector.skops", "manifest.json", "report.json"])
def test_missing_file_is_named(bundle_dir, name):
    (bundle_dir / name).unlink()
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_bundle(bundle_dir)


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Exploit.marker),))


def _rehash(bundle_dir, name):
    """What an attacker who can write the bundle directory does: rewrite the file's hash in the manifest."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((bundle_dir / name).read_bytes()).hexdigest()
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_substituted_pickle_is_never_run_even_with_its_hash_rewritten(bundle_dir, tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    (bundle_dir / "detector.skops").write_bytes(pickle.dumps(_Exploit()))
    _rehash(bundle_dir, "detector.skops")
    with pytest.raises(BundleError, match="detector.skops"):
        load_bundle(bundle_dir)
    assert not marker.exists()


class _Gadget:
    """A type outside the trusted list (skops would build it through its __dict__)."""


def test_a_skops_file_naming_an_untrusted_type_is_refused(bundle_dir):
    import skops.io

    (bundle_dir / "detector.skops").write_bytes(skops.io.dumps({"detector": _Gadget()}))
    _rehash(bundle_dir, "detector.skops")
    with pytest.raises(BundleError, match="outside the trusted list.*_Gadget"):
        load_bundle(bundle_dir)


def test_a_tampered_report_is_refused_even_though_it_is_optional(bundle_dir):
    (bundle_dir / "report.json").write_text('{"detection": {"accuracy": 1.0}}')
    with pytest.raises(BundleError, match=r"report\.json"):
        load_bundle(bundle_dir)


def test_files_the_manifest_does_not_list_are_refused(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    del manifest["files"]["report.json"]  # a report slipped in beside the manifest
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"does not list \(report\.json\)"):
        load_bundle(bundle_dir)
    (bundle_dir / "report.json").unlink()
    assert load_bundle(bundle_dir).report is None
    (bundle_dir / "sub").mkdir()
    (bundle_dir / "sub" / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"sub/extra\.bin"):
        load_bundle(bundle_dir)


def test_one_hex_digit_changed_in_the_manifest_is_refused(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    digest = manifest["files"]["weights.pt"]
    manifest["files"]["weights.pt"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")  # the last digit only
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"weights\.pt"):
        load_bundle(bundle_dir)


def test_pinned_hash_accepts_that_bundle_only(bundle_dir):
    digest = load_bundle(bundle_dir).sha256
    assert load_bundle(bundle_dir, expected_sha256=digest.upper()).sha256 == digest
    other = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    with pytest.raises(BundleError, match="not the pinned one"):
        load_bundle(bundle_dir, expected_sha256=other)
    with pytest.raises(BundleError, match="64 hex digits"):
        load_bundle(bundle_dir, expected_sha256=digest[:12])


def _as_format_1(bundle_dir, detector_bytes: bytes):
    """The layout bundles had before: detector.joblib (a pickle), format_version 1."""
    (bundle_dir / "detector.skops").unlink()
    (bundle_dir / "detector.joblib").write_bytes(detector_bytes)
    config = json.loads((bundle_dir / "config.json").read_text())
    config["format_version"] = 1
    (bundle_dir / "config.json").write_text(json.dumps(config))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bundle_dir.iterdir()
             if p.name != "manifest.json"}
    (bundle_dir / "manifest.json").write_text(json.dumps({"format_version": 1, "files": files}))


def test_a_pickled_bundle_is_refused_with_the_command_that_converts_it(bundle_dir, tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    _as_format_1(bundle_dir, pickle.dumps(_Exploit()))
    with pytest.raises(BundleError, match="detector-bundle convert .* --trust-pickle"):
        load_bundle(bundle_dir)
    assert not marker.exists()


def test_convert_turns_a_trusted_pickled_bundle_into_the_current_format(bundle_dir, digits_test):
    import io

    import joblib

    from training.bundle_tool import main

    before = load_bundle(bundle_dir)
    buffer = io.BytesIO()
    joblib.dump(before.detector, buffer)
    _as_format_1(bundle_dir, buffer.getvalue())
    with pytest.raises(SystemExit):  # the flag is required: converting runs the pickle
        main(["convert", str(bundle_dir)])
    assert main(["convert", str(bundle_dir), "--trust-pickle"]) == 0
    assert not (bundle_dir / "detector.joblib").exists()
    after = load_bundle(bundle_dir)
    x, _ = digits_test.batch(slice(0, 50))
    a, b = before.detect(x), after.detect(x)
    assert np.array_equal(a.adversarial_score, b.adversarial_score) and np.array_equal(a.adversarial, b.adversarial)
    assert main(["verify", str(bundle_dir), "--sha256", after.sha256]) == 0
    assert main(["verify", str(bundle_dir), "--sha256", "0" * 64]) == 1


def test_convert_leaves_the_bundle_whole_when_the_result_would_not_load(bundle_dir, tmp_path, capsys):
    """The pickle is deleted only once the converted bundle loads whole: a config naming an output layer the
    model lacks passes the detector's own check, not loading; and a file it cannot write is an error, not a
    traceback."""
    import io

    import joblib

    from training.bundle_tool import main

    buffer = io.BytesIO()
    joblib.dump(load_bundle(bundle_dir).detector, buffer)
    config = json.loads((bundle_dir / "config.json").read_text())
    config["layer"] = "no_such_layer"
    (bundle_dir / "config.json").write_text(json.dumps(config))
    _as_format_1(bundle_dir, buffer.getvalue())
    before = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    assert main(["convert", str(bundle_dir), "--trust-pickle"]) == 1
    assert "would not load" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == before
    assert [p.name for p in bundle_dir.parent.iterdir() if ".update-" in p.name] == []
    (bundle_dir.parent / f".{bundle_dir.name}.lock").unlink()
    (bundle_dir.parent / f".{bundle_dir.name}.lock").mkdir()  # where the lock file goes: cannot be opened
    assert main(["convert", str(bundle_dir), "--trust-pickle"]) == 1
    assert "detector-bundle: error:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == before


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


def test_weights_of_another_architecture_are_summarised_not_listed():
    from detector.models import build_network, load_weights

    wrn = build_network("wrn", 10, 3, {"depth": 10, "width": 1})
    cnn = build_network("cnn", 10, 3, {})
    with pytest.raises(ValueError) as info:
        load_weights(cnn, wrn.state_dict())
    message = str(info.value)
    assert len(message) < 400, message
    assert "unexpected keys" in message and "missing keys" in message, message
    assert f"the network has {len(cnn.state_dict())} keys, the weights {len(wrn.state_dict())}" in message
    with pytest.raises(ValueError, match="not a state_dict"):
        load_weights(cnn, [1, 2])


def test_weights_saved_before_batchnorm_counted_batches_load():
    """Checkpoints from torch < 0.4.1 (many published CIFAR models) lack num_batches_tracked."""
    from detector.models import build_network, load_weights

    source = build_network("wrn", 10, 3, {"depth": 10, "width": 1})
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = build_network("wrn", 10, 3, {"depth": 10, "width": 1})
    load_weights(target, old)
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert target.state_dict()[key] == 0
        else:
            assert torch.equal(target.state_dict()[key], value), key
    # Only the counters may be absent: a missing running mean is still refused.
    del old[next(k for k in old if k.endswith("running_mean"))]
    with pytest.raises(ValueError, match="1 missing keys"):
        load_weights(build_network("wrn", 10, 3, {"depth": 10, "width": 1}), old)


def test_a_bundle_naming_an_importable_callable_never_calls_it(bundle_dir, tmp_path):
    """config.json is data an attacker can rewrite: 'subprocess:run' with arguments would run a command."""
    marker = tmp_path / "pwned"
    config = json.loads((bundle_dir / "config.json").read_text())
    config["architecture"] = "subprocess:run"
    config["model_config"] = {"args": ["touch", str(marker)]}
    (bundle_dir / "config.json").write_text(json.dumps(config))
    _rehash(bundle_dir, "config.json")
    with pytest.raises(BundleError, match="subprocess:run.*trust"):
        load_bundle(bundle_dir)
    assert not marker.exists()


def test_a_bundle_declaring_a_huge_input_is_refused_before_anything_is_allocated(bundle_dir):
    """The service warms up with whole batches of the declared input: 100,000 × 100,000 would exhaust memory."""
    config = json.loads((bundle_dir / "config.json").read_text())
    config["input_spec"].update(height=100_000, width=100_000)
    (bundle_dir / "config.json").write_text(json.dumps(config))
    _rehash(bundle_dir, "config.json")
    with pytest.raises(BundleError, match="100000×100000 pixels: at most 1024 on a side"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("model_config, limit", [
    ({"width": 512}, "numbers"),           # a small network's weights, a 48 M-parameter network
    ({"width": 10**7}, "numbers"),         # 10^15 parameters: would exhaust any machine
    ({"width": -1}, None),                 # torch's RuntimeError for a negative size, not a crash
    ({"width": "x"}, None),
])
def test_a_bundle_whose_config_asks_for_a_network_its_weights_cannot_fill_is_refused(
        bundle_dir, model_config, limit):
    """config.json is data: a network larger than its weights could fill, or one torch cannot build,
    is refused with the files named, before memory is spent on it."""
    config = json.loads((bundle_dir / "config.json").read_text())
    config["model_config"] = model_config
    (bundle_dir / "config.json").write_text(json.dumps(config))
    _rehash(bundle_dir, "config.json")
    expected = (f"network of more than [0-9,]+ {limit}, more than its weights could fill" if limit
                else "config.json and weights.pt do not make architecture 'cnn'")
    with pytest.raises(BundleError, match=expected):
        load_bundle(bundle_dir)


def test_a_network_of_many_small_modules_is_refused_as_it_grows():
    """Depth is counted in modules: 10^7 blocks would take minutes and gigabytes even on the meta device."""
    from detector.models import build_classifier, classifier_for_weights

    weights = build_classifier("wrn", 10, 3, config={"depth": 10, "width": 1}).state_dict()
    with pytest.raises(ValueError, match="more than [0-9,]+ submodules"):
        classifier_for_weights("wrn", 10, 3, None, None, {"depth": 6 * 10**7 + 4, "width": 1}, weights)
    with pytest.raises(ValueError, match="missing keys"):  # near the budget: built without memory, then checked
        classifier_for_weights("wrn", 10, 3, None, None, {"depth": 16, "width": 1}, weights)
    model = classifier_for_weights("wrn", 10, 3, None, None, {"depth": 10, "width": 1}, weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not any(p.is_meta for p in model.parameters())


def _rezip_deflated(data: bytes) -> bytes:
    """The same archive with every member deflated: what a zip bomb looks like to a reader."""
    import io
    import zipfile

    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    return out.getvalue()


def _weights_of_repeated_numbers(bundle_dir):
    """weights.pt whose every tensor is one number seen through a stride-0 view: a 4 KB file that
    declares any number of weights, so a network far larger than the file would pass a count of them."""
    state = torch.load(bundle_dir / "weights.pt", weights_only=True)
    torch.save({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state.items()}, bundle_dir / "weights.pt")
    _rehash(bundle_dir, "weights.pt")


def _deflate(name):
    def rewrite(bundle_dir):
        (bundle_dir / name).write_bytes(_rezip_deflated((bundle_dir / name).read_bytes()))
        _rehash(bundle_dir, name)
    return rewrite


def _second_central_directory(bundle_dir):
    """weights.pt with a copy of its central directory between the real one and the end records:
    Python's zipfile reads the copy (found back from the end record), torch the real one (by the
    offset fields). Both are honest here; an attacker's copy lists something else."""
    import struct

    data = (bundle_dir / "weights.pt").read_bytes()
    locator_at = len(data) - 22 - 20  # torch writes zip64 end records: record, locator, end record
    zip64_at, = struct.unpack_from("<Q", data, locator_at + 8)
    size, offset = struct.unpack_from("<QQ", data, zip64_at + 40)
    copy = data[offset:offset + size]
    locator = bytearray(data[locator_at:locator_at + 20])
    struct.pack_into("<Q", locator, 8, zip64_at + len(copy))
    data = data[:zip64_at] + copy + data[zip64_at:locator_at] + bytes(locator) + data[locator_at + 20:]
    torch.load(io.BytesIO(data), weights_only=True)  # torch still reads it
    (bundle_dir / "weights.pt").write_bytes(data)
    _rehash(bundle_dir, "weights.pt")


def _schema_of_shared_nodes(bundle_dir):
    """detector.skops with an attribute of 21 nested lists, each holding the one before twice (once by
    reference): a few kilobytes that skops' audit walks 2^21 times (10 s; each level doubles it)."""
    import zipfile

    raw = (bundle_dir / "detector.skops").read_bytes()
    source = zipfile.ZipFile(io.BytesIO(raw))
    schema = json.loads(source.read("schema.json"))
    node = {"__class__": "int", "__module__": "builtins", "__loader__": "JsonNode", "content": "1", "is_json": True,
            "__id__": 900000}
    for i in range(1, 22):
        node = {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode", "__id__": 900000 + i,
                "content": [node, {"__id__": 900000 + i - 1}]}
    schema["content"]["content"]["junk"] = node
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, json.dumps(schema) if info.filename == "schema.json"
                            else source.read(info.filename))
    (bundle_dir / "detector.skops").write_bytes(out.getvalue())
    _rehash(bundle_dir, "detector.skops")


def _alias_in_manifest(bundle_dir):
    """The same file under many names, each hashed (and weights.pt loaded) again."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"]["x/../figure.png"] = manifest["files"]["figure.png"]
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def _tree_with_a_loop(bundle_dir):
    """A decision tree whose root is its own left child: scikit-learn's compiled walk never ends
    (an index out of range instead reads outside memory)."""
    import skops.io as sio

    from detector.bundle import TRUSTED_TYPES

    detector = sio.loads((bundle_dir / "detector.skops").read_bytes(), trusted=list(TRUSTED_TYPES))
    state = detector.estimator_.tree_.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = nodes["right_child"][0] = 0
    detector.estimator_.tree_.__setstate__({**state, "nodes": nodes})
    (bundle_dir / "detector.skops").write_bytes(sio.dumps(detector))
    _rehash(bundle_dir, "detector.skops")


def _manifest(**changes):
    def rewrite(bundle_dir):
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        manifest.update(changes)
        (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    return rewrite


def _config(**changes):
    def rewrite(bundle_dir):
        config = json.loads((bundle_dir / "config.json").read_text())
        config.update(changes)
        (bundle_dir / "config.json").write_text(json.dumps(config))
        _rehash(bundle_dir, "config.json")
    return rewrite


def _report(text: str):
    def rewrite(bundle_dir):
        (bundle_dir / "report.json").write_text(text)
        _rehash(bundle_dir, "report.json")
    return rewrite


@pytest.mark.parametrize("tamper, message", [
    (_weights_of_repeated_numbers, r"'net\.features\.0\.weight' is not a plain tensor holding its 288 numbers"),
    (_deflate("weights.pt"), r"weights\.pt has a compressed member"),
    (_deflate("detector.skops"), r"detector\.skops has a compressed member"),
    (_second_central_directory, r"weights\.pt has a central directory away from where its end record says"),
    (_schema_of_shared_nodes, r"detector\.skops has a schema of [0-9,]+ nodes once its references are followed"),
    (_alias_in_manifest, r"lists 'x/\.\./figure\.png', which is not a plain path in the bundle"),
    (_tree_with_a_loop, r"a decision tree has nodes that point outside it, backwards"),
    (_manifest(format_version=3), r"is format 3, written by a newer version of this package \(this one reads "
                                  r"formats up to 2\): upgrade"),
    (_manifest(format_version="2"), r"manifest\.json .* is malformed: ValueError: format_version '2' is not a whole"),
    (_manifest(format_version=True), r"manifest\.json .* is malformed: ValueError: format_version True"),
    (_manifest(algorithm="md5"), r"manifest\.json .* is malformed: ValueError: algorithm 'md5': only sha256"),
    (_config(classes=[]), r"config\.json is malformed: ValueError: classes must be a list of at least two"),
    (_config(input_spec={"channels": 1, "height": 8, "width": 8, "mean": [0.5], "std": [float("nan")]}),
     r"config\.json is malformed: .*std above 0"),
    (_config(thresholds=[]), r"config\.json is malformed: AttributeError"),
    (_config(layer="nope"), r"config\.json names an output layer the model does not have: .*'nope'"),
    (_report('["detection"]'), r"report\.json is malformed: a JSON list, not an object"),
    # /model could not serialise it (pydantic stops at some hundred levels): every request would fail
    (_report('{"detection": ' + '{"k": ' * 300 + "1" + "}" * 301), r"report\.json is malformed: nested deeper"),
], ids=["stride-0 weights", "deflated weights", "deflated detector", "two directories", "shared nodes", "alias",
        "tree loop", "newer format", "format as text", "format as bool", "md5", "no classes",
        "nan std", "thresholds list", "no such layer", "report list", "report nested"])
def test_a_crafted_bundle_is_refused_with_the_file_named(bundle_dir, tamper, message):
    """Unchecked, each of these loads (and then exhausts memory, hangs or crashes at the first
    detection) or raises something other than BundleError, which the service would not report as the
    bundle's fault."""
    tamper(bundle_dir)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


def test_an_infinite_valley_threshold_is_refused(bundle_dir, tmp_path, digits_model):
    """τ is a quantile of clean κ; an infinite one would be served as JSON null where a number is due."""
    bundle = load_bundle(bundle_dir)
    bundle.detector.valley_threshold_ = float("inf")
    (tmp_path / "inf").mkdir()
    save_bundle(tmp_path / "inf", model=digits_model, architecture="cnn", model_config={}, detector=bundle.detector,
                classes=bundle.classes, input_spec=bundle.input_spec)
    with pytest.raises(BundleError, match="valley_threshold_ is inf, not a finite number"):
        load_bundle(tmp_path / "inf")


def test_update_bundle_adds_records_under_a_new_hash(bundle_dir):
    from detector import update_bundle, verify_bundle

    before = verify_bundle(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())["files"]
    after = update_bundle(bundle_dir, lambda stage: (stage / "notes.md").write_text("evaluated\n"),
                          expected_sha256=before)
    assert after != before and verify_bundle(bundle_dir) == after
    files = json.loads((bundle_dir / "manifest.json").read_text())["files"]
    assert files == {**manifest, "notes.md": hashlib.sha256(b"evaluated\n").hexdigest()}
    assert load_bundle(bundle_dir, expected_sha256=after).report == {"detection": {"accuracy": 0.5}}
    # No staging copy left behind; the lock file stays (removing it could let two updates in at once).
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == [".b.lock", "b"]


def test_update_bundle_never_changes_what_makes_the_verdicts(bundle_dir):
    from detector import update_bundle, verify_bundle

    before = verify_bundle(bundle_dir)
    for name in ("weights.pt", "detector.skops", "config.json"):
        def tamper(stage, name=name):
            (stage / "notes.md").write_text("x")
            (stage / name).write_bytes((stage / name).read_bytes() + b" ")

        with pytest.raises(BundleError, match=f"not change {name}"):
            update_bundle(bundle_dir, tamper)
        assert verify_bundle(bundle_dir) == before and not (bundle_dir / "notes.md").exists()

    def fail(stage):
        (stage / "notes.md").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        update_bundle(bundle_dir, fail)
    assert verify_bundle(bundle_dir) == before and sorted(p.name for p in bundle_dir.parent.iterdir()) == [".b.lock", "b"]
    # Another bundle than the pinned one, or one with a tampered file, is not updated at all.
    with pytest.raises(BundleError, match="not the pinned one"):
        update_bundle(bundle_dir, lambda stage: None, expected_sha256="0" * 64)
    (bundle_dir / "figure.png").write_bytes(b"changed")
    with pytest.raises(BundleError, match="figure.png does not match"):
        update_bundle(bundle_dir, lambda stage: None)


def test_update_bundle_through_a_link_or_from_inside_keeps_the_layout(bundle_dir, tmp_path, monkeypatch):
    import os

    from detector import update_bundle, verify_bundle

    os.chmod(bundle_dir, 0o755)
    (tmp_path / "current").symlink_to(bundle_dir)
    (tmp_path / f".{bundle_dir.name}.update-killed").mkdir()  # what an update killed midway left
    digest = update_bundle(tmp_path / "current", lambda stage: (stage / "a.md").write_text("a"))
    assert (tmp_path / "current").is_symlink() and verify_bundle(bundle_dir) == digest
    assert (bundle_dir / "a.md").read_text() == "a" and oct(bundle_dir.stat().st_mode & 0o777) == "0o755"
    assert not list(tmp_path.glob(".*update*")) and not list(tmp_path.glob(".*old*"))
    monkeypatch.chdir(bundle_dir)
    digest = update_bundle(".", lambda stage: (stage / "b.md").write_text("b"))
    assert verify_bundle(bundle_dir) == digest and not list(bundle_dir.glob(".*"))


def test_two_updates_of_one_bundle_never_interleave(bundle_dir):
    import threading

    from detector import update_bundle, verify_bundle

    before = verify_bundle(bundle_dir)
    inside, release = threading.Event(), threading.Event()

    def slow(stage):
        (stage / "first.md").write_text("1")
        inside.set()
        release.wait(30)

    first = threading.Thread(target=update_bundle, args=(bundle_dir, slow, before))
    first.start()
    assert inside.wait(30)
    outcome = {}

    def second():
        try:
            update_bundle(bundle_dir, lambda stage: (stage / "second.md").write_text("2"), before)
        except BundleError as exc:
            outcome["refused"] = str(exc)

    other = threading.Thread(target=second)
    other.start()
    other.join(1.0)
    assert other.is_alive()  # waits for the first update's lock
    release.set()
    first.join(30)
    other.join(30)
    # Both were pinned to the bundle as it was: the second finds another bundle and changes nothing.
    assert "not the pinned one" in outcome["refused"]
    assert (bundle_dir / "first.md").is_file() and not (bundle_dir / "second.md").exists()


def test_update_bundle_where_the_system_cannot_exchange_two_directories(bundle_dir, monkeypatch):
    import detector.bundle as bundle_module
    from detector import update_bundle, verify_bundle

    monkeypatch.setattr(bundle_module.ctypes, "CDLL", lambda *args, **kwargs: object())  # no renameat2
    digest = update_bundle(bundle_dir, lambda stage: (stage / "a.md").write_text("a"))
    assert verify_bundle(bundle_dir) == digest and (bundle_dir / "a.md").is_file()
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == [".b.lock", "b"]
