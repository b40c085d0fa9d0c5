"""The training pipeline end to end, for real: digits, CIFAR-10 (shared rebuilt copy and
torchvision's on-disk format), every built-in architecture, image folders, and a bring-your-own
classifier the project does not ship.  No mocks: real data, real training, real PGD."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detector import (
    BundleError,
    ImageClassifier,
    load_bundle,
    load_dataset,
    pgd,
    verify_bundle,
)
from detector.datasets import CIFAR10_CLASSES
from detector.metrics import roc_rates
from training.attacking import top_up_calibration
from training.classifier import accuracy, robust_accuracy
from training.cli import build_parser, main, options_from_args, trajectory_main
from training.fitting import CLEAN_VARIANTS, seen_in_fitting
from training.options import PipelineError, TrainOptions, attack_settings
from training.pipeline import run
from training.prepare import load_splits, read_state_dict

TESTS = Path(__file__).resolve().parent

REQUIRED_KEYS = (
    "classifier.clean_accuracy", "attack.success_rate", "attack.eps", "attack.steps",
    "detection.accuracy", "detection.auroc", "detection.tpr_at_5_fpr", "detection.n_test",
    "valley.threshold", "valley.fraction", "trajectory.mean_sharpness", "trajectory.mean_loss",
    "timing.seconds",
)


def dotted(report: dict, key: str):
    value = report
    for part in key.split("."):
        value = value[part]
    return value


def check_report(report: dict, steps: int) -> None:
    """Keys, types and ranges every report must have, whatever the run."""
    for key in REQUIRED_KEYS:
        dotted(report, key)  # KeyError names the missing key
    for key in ("mean_sharpness", "mean_loss", "median_sharpness", "misclassified_fraction",
                "detection_rate"):
        assert len(report["trajectory"][key]) == steps + 1, key
    assert report["attack"]["steps"] == steps
    for key in ("accuracy", "balanced_accuracy", "auroc", "tpr_at_5_fpr", "tnr_at_95_tpr"):
        assert 0.0 <= report["detection"][key] <= 1.0, key
    assert 0.0 <= report["valley"]["fraction"] <= 1.0
    assert report["detection"]["n_test_adversarial"] * 2 == report["detection"]["n_test"]  # 50:50
    # PGD stays in its ball (float32 rounding aside).
    if report["attack"]["norm"] == "linf":
        assert report["attack"]["max_linf"] <= report["attack"]["eps"] + 1e-5
    # The path starts at the clean inputs the classifier gets right.
    assert report["trajectory"]["misclassified_fraction"][0] == 0.0
    seconds = report["timing"]["seconds"]
    assert {"classifier_train", "attack", "detector_fit", "evaluation", "total"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())


def check_bundle(out: Path, report: dict) -> None:
    """The bundle verifies and loads, its manifest covers the plots, and the reloaded model is the
    one the report measured."""
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for name in ("report.json", "report.md", "figure1_trajectory.png", "roc.png", "distributions.png",
                 "trajectory.csv", "split.json", "weights.pt", "detector.skops", "config.json"):
        assert name in manifest, name
        assert (out / name).stat().st_size > 0, name
    for png in ("figure1_trajectory.png", "roc.png", "distributions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verify_bundle(out)
    bundle = load_bundle(out, trusted_architectures=[report["classifier"]["architecture"]])
    assert json.loads((out / "report.json").read_text()) == report == bundle.report
    split = json.loads((out / "split.json").read_text())
    assert split["fit"] and split["held_out"] and split["calibration"]
    fit, calibration, held_out = set(split["fit"]), set(split["calibration"]), set(split["held_out"])
    # never the same image in two parts
    assert not fit & held_out and not fit & calibration and not calibration & held_out
    # the attacked images are split three ways; the calibration images beyond them were never attacked
    topped_up = report["detection"].get("n_calibration_not_attacked", 0)
    assert len(calibration) == report["detection"]["n_calibration_images"]
    assert len(fit) + len(calibration) + len(held_out) == report["attack"]["n_attacked"] + topped_up
    # every row the detection metrics were computed on comes from a held-out image, one clean and one
    # adversarial row per successfully attacked image at most
    rows = split["held_out_rows"]
    assert len(rows) == report["detection"]["n_test"] and set(rows) <= held_out
    if "evaluated" in split:
        assert not set(split["evaluated"]) & (fit | calibration)


def check_served_operating_point(out: Path, test) -> None:
    """The bundle as the service loads it flags exactly the share of its calibration images (``split.json``
    ids in the full test split ``test``, as they came) that fitting reported: the operating point holds
    on the served path, not only on the rows the pipeline computed."""
    report = json.loads((out / "report.json").read_text())
    ids = json.loads((out / "split.json").read_text())["calibration"]
    bundle = load_bundle(out, trusted_architectures=[report["classifier"]["architecture"]])
    flagged = np.concatenate([bundle.detect(test.batch(torch.as_tensor(ids[i:i + 256]))[0]).adversarial
                              for i in range(0, len(ids), 256)])
    assert len(flagged) == report["detection"]["n_calibration_images"]
    assert int(flagged.sum()) == round(report["detection"]["calibration_fpr_as_given"] * len(ids))


def check_calibration_top_up(out: Path, test, n_split: int, asked: int) -> None:
    """The calibration images beyond the attacked ones: every calibration image (``split.json`` ids in the
    full test split ``test``) is one the classifier gets right, none was evaluated, and there are as many
    as asked (``asked`` in all) or, when fewer are left, every correctly classified image of the
    ``n_split`` test images that is neither attacked nor evaluated."""
    report = json.loads((out / "report.json").read_text())
    split = json.loads((out / "split.json").read_text())
    bundle = load_bundle(out, trusted_architectures=[report["classifier"]["architecture"]])

    def right(ids):
        ids = torch.as_tensor(ids, dtype=torch.long)
        x, y = test.batch(ids)
        return bundle.detect(x).labels == y.numpy()

    assert right(split["calibration"]).all()
    evaluated = set(split["evaluated"])
    assert not evaluated & set(split["calibration"])
    n_attacked = report["attack"]["n_attacked"]
    attacked_calibration = n_attacked - len(split["fit"]) - len(split["held_out"])
    not_attacked = sorted(evaluated - set(split["held_out"]))
    n_correct = round(report["classifier"]["clean_accuracy"] * n_split)
    left = n_correct - n_attacked - int(right(not_attacked).sum())
    assert report["detection"]["n_calibration_not_attacked"] == min(asked - attacked_calibration, left) > 0


@pytest.fixture(scope="module")
def default_report(default_bundle) -> dict:
    return json.loads((default_bundle / "report.json").read_text())


# --- the embedded default -------------------------------------------------------------------------


def test_no_arguments_means_the_embedded_default():
    options = options_from_args(build_parser().parse_args([]), "detector-train")
    assert options == TrainOptions(command="detector-train")
    assert (options.model, options.data, options.out) == ("cnn", "digits", "artifacts/default")
    attack = attack_settings(options)
    assert (attack.eps, attack.alpha, attack.steps, attack.norm) == (0.2, 0.05, 10, "linf")
    args = build_parser().parse_args(["--eps", "8/255", "--alpha", "2/255", "--mean", "0.49,0.48", "0.45",
                                      "--std", "0.25", "--arch-kwargs", '{"hidden": 8}'])
    assert (args.eps, args.alpha) == (8 / 255, 2 / 255)
    parsed = options_from_args(args, "x")
    assert parsed.mean == [0.49, 0.48, 0.45] and parsed.std == [0.25] and parsed.arch_kwargs == {"hidden": 8}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--eps", "8/0"])


def test_default_run_report_is_sane(default_bundle, default_report):
    report = default_report
    check_report(report, steps=10)
    check_bundle(default_bundle, report)
    check_served_operating_point(default_bundle, load_dataset("digits", train=False))
    # digits leaves no correctly classified test image over for more calibration images
    assert report["detection"]["n_calibration_not_attacked"] == 0
    assert report["data"]["spec"] == "digits" and report["classifier"]["architecture"] == "cnn"
    assert report["classifier"]["epochs"] == 10
    assert report["classifier"]["clean_accuracy"] > 0.95
    assert report["attack"]["eps"] == 0.2 and report["attack"]["defaults"] == "digits"
    assert report["attack"]["success_rate"] > 0.95
    det = report["detection"]
    # Measured 75.2% and 0.807 on 262 held-out vectors; chance is 0.5 (one standard error ≈ 0.03).
    assert det["accuracy"] > 0.6 and det["auroc"] > 0.65, det
    assert det["n_test"] >= 150
    # The uncanny valley on digits: mean κ rises as the inputs reach the boundary, then falls
    # below its peak once the labels have flipped, while the loss keeps rising.
    tr = report["trajectory"]
    kappa, loss = np.array(tr["mean_sharpness"]), np.array(tr["mean_loss"])
    assert 0 < tr["peak_step"] < 10
    assert kappa.max() > 3 * kappa[0]
    assert kappa[-1] < 0.5 * kappa.max()
    assert loss[-1] > loss[tr["peak_step"]] > loss[0]
    # The tree, fitted on endpoints, flags the end of the path far more often than its start.
    assert tr["detection_rate"][-1] > tr["detection_rate"][0] + 0.2
    # The reloaded bundle's classifier is the one that was measured.
    bundle = load_bundle(default_bundle)
    test = load_dataset("digits", train=False)
    assert accuracy(bundle.model, test) == pytest.approx(report["classifier"]["clean_accuracy"])
    # The held-out images can be rebuilt from the bundle: split.json, or the pipeline's own helpers.
    from training.attacking import select_correct
    from training.fitting import split_images

    options = report["options"]
    index = select_correct(bundle.model, test, options["max_samples"], options["seed"], torch.device("cpu"))
    held_out = index[split_images(len(index), options["test_fraction"], options["seed"])[1]]
    assert held_out.tolist() == json.loads((default_bundle / "split.json").read_text())["held_out"]
    # Recounted independently: the report's held-out set has one clean and one adversarial row per
    # held-out image the bundle's own attack fools, no more and no fewer.
    a = report["attack"]
    x, y = test.batch(torch.as_tensor(held_out))
    fooled = int((bundle.model(pgd(bundle.model, x, y, eps=a["eps"], alpha=a["alpha"], steps=a["steps"])).argmax(1)
                  != y).sum())
    assert det["n_test"] == 2 * fooled
    md = (default_bundle / "report.md").read_text()
    assert "figure1_trajectory.png" in md and f"{100 * det['accuracy']:.1f}%" in md
    # The default reads earlier layers too, and the report says so.
    assert (det["probes"], det["probe_means"]) == (3, True)
    assert "`curvature` features and the Mahalanobis distances of up to 3 earlier layers and of φ and their " \
           "channel means" in md
    # The first command's summary says what getting past classifier and detector costs.
    from training.report import summary_text

    budget = report["evaluation"]["evasion_budget"]["groups"]
    assert {"all attacks", "minimal", "adaptive"} <= set(budget)
    assert all("per_input_linf" not in g for g in budget.values())  # report.json: no per-row lists
    assert budget["all attacks"]["linf"]["n"] == report["evaluation"]["attacks"][0]["n_attacked"]
    summary = summary_text(report)
    assert "budget       all attacks" in summary and "budget       minimal" in summary
    assert "Evasion budget" in md
    # The operating point holds on the calibration images as they came, not only pooled with their variants.
    assert det["calibration_fpr"] <= det["target_fpr"] and det["calibration_fpr_as_given"] <= det["target_fpr"]
    assert "on the images as they came" in md
    # What it was fitted on is recorded, and the coverage table marks the attacks among them.
    fitted = det["fitted_on"]
    assert list(fitted["attacks"]) == list(fitted["adversarial"])
    assert [a["attack"] for a in fitted["attacks"].values()] == ["pgd", "fgsm", "pgd"]
    seen = ["FGSM L∞ 8/255", "PGD-10 L∞ 2/255", "PGD-10 L∞ 8/255"]
    assert [s for s in report["evaluation"]["seen_in_fitting"] if s in {a["label"] for a in
                                                                      report["evaluation"]["attacks"]}] == seen
    assert all(f"| {label} (seen in fitting) |" in md for label in seen)
    assert "| PGD L∞ 8/255, stopped at first misclassification (seen in fitting) |" not in md
    assert report["evaluation"]["suite"] == "quick" and "The quick suite." in md
    assert report["evaluation"]["detector"]["name"] == "activations" and "Detector: `activations`, " in md


def test_trajectory_command_on_saved_weights(default_bundle, default_report, tmp_path, capsys):
    """detector-trajectory with a bundle's weights.pt (a whole ImageClassifier, normalisation
    included) as a user's pretrained model: no retraining, its own attack settings."""
    out = tmp_path / "traj"
    code = trajectory_main(["--weights", str(default_bundle / "weights.pt"), "--steps", "6",
                            "--eps", "0.3", "--alpha", "0.1", "--max-samples", "150",
                            "--out", str(out), "--no-progress"])
    assert code == 0
    assert "peak at step" in capsys.readouterr().out
    summary = json.loads((out / "trajectory.json").read_text())
    assert summary["classifier"]["epochs"] == 0
    assert summary["classifier"]["normalisation"] == "weights file"
    assert summary["classifier"]["clean_accuracy"] == pytest.approx(default_report["classifier"]["clean_accuracy"])
    assert (summary["attack"]["steps"], summary["attack"]["alpha"]) == (6, 0.1)
    with open(out / "trajectory.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(7))
    kappa = [float(r["mean_sharpness"]) for r in rows]
    assert kappa == pytest.approx(summary["trajectory"]["mean_sharpness"], rel=1e-5)
    assert max(kappa) > 3 * kappa[0] and kappa[-1] < max(kappa)  # rises, then falls
    with open(out / "trajectory_per_example.csv") as f:
        per_example = list(csv.DictReader(f))
    assert len(per_example) == 150 and "kappa_6" in per_example[0]
    assert (out / "figure1_trajectory.png").read_bytes()[:4] == b"\x89PNG"
    for bad in ("0", "-5"):  # not "the classifier gets nothing right", nor all but five images
        with pytest.raises(SystemExit) as stop:
            trajectory_main(["--weights", str(default_bundle / "weights.pt"), "--max-samples", bad,
                             "--out", str(tmp_path / "t0"), "--no-progress"])
        assert stop.value.code == 2 and "--max-samples: must be at least 1" in capsys.readouterr().err


def test_detector_set_is_balanced_and_split_by_image(digits_model, digits_test):
    """On real PGD paths: each side holds only its own images, 50:50, clean rows are the clean
    images' ψ and adversarial rows the path's last step; the path starts at the clean ψ."""
    from training.attacking import attack_paths, sample_correct
    from training.fitting import balanced_side, split_images
    from training.options import AttackSettings

    with torch.no_grad():
        correct = (digits_model(digits_test.batch(slice(None))[0]).argmax(1) == digits_test.labels).numpy()
    index = sample_correct(correct, 60, seed=0)
    attacked = attack_paths(digits_model, digits_test, index, AttackSettings(0.3, 0.1, 4, "linf", False, "given"),
                            layer=None, device=torch.device("cpu"), batch_size=25, seed=0, progress=False)
    assert len(index) == 60 and correct[index].all()
    assert attacked.psi.shape == (60, 5, 10) and attacked.success.mean() > 0.9
    np.testing.assert_allclose(attacked.psi[:, 0], attacked.clean_psi, rtol=1e-4, atol=1e-9)
    fit_images, test_images = split_images(60, 0.3, seed=0)
    assert len(test_images) == 18 and not set(fit_images) & set(test_images)
    rng = np.random.default_rng(0)
    for images in (fit_images, test_images):
        side = balanced_side(attacked, images, rng)
        assert set(side.image) <= set(images)
        adv = side.is_adv == 1
        assert adv.sum() == (~adv).sum() == attacked.success[images].sum()
        np.testing.assert_array_equal(side.psi[adv], attacked.psi[side.image[adv], -1])
        np.testing.assert_array_equal(side.psi[~adv], attacked.clean_psi[side.image[~adv]])
        np.testing.assert_array_equal(side.kappa[adv], attacked.sharpness[side.image[adv], -1])
        assert attacked.success[side.image[adv]].all()


# --- bring your own model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byo_checkpoint(tmp_path_factory):
    """The user's side: their own model class, trained by their own plain-torch loop on
    normalised digits, saved as a DataParallel checkpoint dict.  Returns (file, mean, std, acc)."""
    import byo_models

    train, test = load_dataset("digits", train=True), load_dataset("digits", train=False)
    mean, std = 0.3, 0.4
    torch.manual_seed(0)
    net = byo_models.make_digits_net(hidden=48)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    x_all, y_all = train.batch(slice(None))
    for _ in range(6):
        for idx in torch.randperm(len(train)).split(64):
            loss = nn.functional.cross_entropy(net((x_all[idx] - mean) / std), y_all[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        x, y = test.batch(slice(None))
        acc = float((net((x - mean) / std).argmax(1) == y).float().mean())
    path = tmp_path_factory.mktemp("byo") / "checkpoint.pt"
    torch.save({"epoch": 6, "model_state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "optimizer": "adam"}, path)
    return path, mean, std, acc


def test_bring_your_own_model(byo_checkpoint, tmp_path, monkeypatch, capsys):
    path, mean, std, acc = byo_checkpoint
    monkeypatch.syspath_prepend(str(TESTS))
    assert acc > 0.9
    base = ["--arch", "byo_models:make_digits_net", "--arch-kwargs", '{"hidden": 48}',
            "--weights", str(path), "--mean", str(mean), "--std", str(std), "--no-progress"]
    # Its last nn.Linear is an auxiliary head: without --layer the run stops with a clear error.
    with pytest.raises(SystemExit) as stop:
        main([*base, "--out", str(tmp_path / "nolayer")])
    assert stop.value.code == 2
    assert "--layer" in capsys.readouterr().err
    assert not (tmp_path / "nolayer").exists()

    out = tmp_path / "byo"
    assert main([*base, "--layer", "classifier", "--out", str(out)]) == 0
    assert "detection" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    check_report(report, steps=10)
    check_bundle(out, report)
    c = report["classifier"]
    assert c["byo"] and c["architecture"] == "byo_models:make_digits_net" and c["layer"] == "net.classifier"
    assert c["epochs"] == 0 and c["model_config"] == {"hidden": 48}  # used as it is, not retrained
    assert c["mean"] == [mean] and c["std"] == [std] and c["normalisation"] == "given"
    assert c["clean_accuracy"] == pytest.approx(acc)  # the user's model, their accuracy
    assert report["attack"]["success_rate"] > 0.9
    # Measured 61.9% and 0.653 on 260 held-out vectors: above chance, and the valley is there.
    assert report["detection"]["accuracy"] > 0.55 and report["detection"]["auroc"] > 0.55
    kappa = np.array(report["trajectory"]["mean_sharpness"])
    assert kappa.max() > 3 * kappa[0] and kappa[-1] < 0.5 * kappa.max()
    # The service rebuilds it from the bundle alone (factory + kwargs + weights + layer).
    with pytest.raises(BundleError, match="byo_models:make_digits_net.*trust"):
        load_bundle(out)  # a factory to import and call: only on the user's word
    bundle = load_bundle(out, trusted_architectures=["byo_models:make_digits_net"])
    assert bundle.architecture == "byo_models:make_digits_net" and bundle.layer == "net.classifier"
    assert accuracy(bundle.model, load_dataset("digits", train=False)) == pytest.approx(acc)
    # The attack suite judges it too, at its own output layer (the adaptive attacks read it).
    from training.evaluate import main as evaluate_main

    assert evaluate_main(["--bundle", str(out), "--suite", "quick", "--max-images", "60", "--out",
                          str(tmp_path / "byo-ev"), "--no-progress",
                          "--trust-architecture", "byo_models:make_digits_net"]) == 0
    ev = json.loads((tmp_path / "byo-ev" / "evaluation.json").read_text())
    assert {a["attack"] for a in ev["attacks"]} >= {"fgsm", "pgd", "backoff", "margin-capped"}
    assert all(a["success"]["n"] > 0 for a in ev["attacks"])


def test_bring_your_own_model_fine_tuned_adversarially(byo_checkpoint, tmp_path, monkeypatch, capsys):
    """``--adversarial-training`` fine-tunes a user's weights: the bundle's classifier resists PGD
    at the training radius far better than the checkpoint it started from."""
    path, mean, std, _ = byo_checkpoint
    monkeypatch.syspath_prepend(str(TESTS))
    import byo_models

    net = byo_models.make_digits_net(hidden=48)
    net.load_state_dict(read_state_dict(path))
    test = load_dataset("digits", train=False)
    x, y = test.batch(slice(None))
    before = robust_accuracy(ImageClassifier(net, [mean], [std]).eval(), x, y, 0.2)
    out = tmp_path / "byo-robust"
    assert main(["--arch", "byo_models:make_digits_net", "--arch-kwargs", '{"hidden": 48}', "--weights", str(path),
                 "--mean", str(mean), "--std", str(std), "--layer", "classifier", "--epochs", "6", "--lr", "0.02",
                 "--adversarial-training", "fast", "--max-samples", "300", "--evaluate", "none",
                 "--no-progress", "--out", str(out)]) == 0
    assert "fast adversarial training" in capsys.readouterr().out
    c = json.loads((out / "report.json").read_text())["classifier"]
    at = c["adversarial_training"]
    assert at["kind"] == "fast" and at["eps"] == 0.2 and at["alpha"] == pytest.approx(0.25)
    assert len(at["history"]) == 6 and at["stopped"] is None
    assert c["robust_accuracy"]["n"] == len(test)
    # Measured: 2% before, about 40% after, clean accuracy still above 90%.
    assert before < 0.1
    assert c["robust_accuracy"]["accuracy"] > before + 0.2
    assert c["clean_accuracy"] > 0.85
    bundle = load_bundle(out, trusted_architectures=["byo_models:make_digits_net"])
    assert robust_accuracy(bundle.model, x, y, 0.2) == pytest.approx(c["robust_accuracy"]["accuracy"])
    assert "adversarial training" in (out / "report.md").read_text()


def test_state_dict_formats(tmp_path):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    state = net.state_dict()
    for name, obj in {
        "plain": state,
        "ddp": {f"module.{k}": v for k, v in state.items()},
        "compiled": {"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}, "epoch": 3},
        "nested": {"model": {f"module.module.{k}": v for k, v in state.items()}, "acc": 0.9},
    }.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        loaded = read_state_dict(tmp_path / f"{name}.pt")
        assert loaded.keys() == state.keys(), name
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).load_state_dict(loaded)
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(PipelineError, match="no state_dict"):
        read_state_dict(tmp_path / "empty.pt")
    torch.save({"state_dict": state, "args": _Unsafe()}, tmp_path / "pickled.pt")  # not weights-only
    with pytest.raises(PipelineError, match="weights_only"):
        read_state_dict(tmp_path / "pickled.pt")
    with pytest.raises(PipelineError, match="no file"):
        read_state_dict(tmp_path / "absent.pt")


class _Unsafe:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""


def test_calibration_top_up_takes_only_correct_images_outside_the_taken_ones():
    """The calibration images beyond the attacked ones: correctly classified, never one already attacked
    or evaluated, as many as asked while there are some, the same draw for the same seed."""
    correct = np.zeros(100, bool)
    correct[::2] = True
    taken = np.arange(0, 40)
    picked = top_up_calibration(correct, taken, 20, seed=0)
    assert len(picked) == 20 and np.all(correct[picked]) and not np.intersect1d(picked, taken).size
    assert np.array_equal(picked, np.sort(picked)) and np.array_equal(picked, top_up_calibration(correct, taken, 20, 0))
    assert not np.array_equal(picked, top_up_calibration(correct, taken, 20, seed=1))
    # fewer left than asked: every one of them; none asked (or fewer than none): none
    assert np.array_equal(top_up_calibration(correct, taken, 1000, 0), np.arange(40, 100, 2))
    assert top_up_calibration(correct, taken, 0, 0).size == top_up_calibration(correct, taken, -5, 0).size == 0
    # one more image taken changes the draw by that image at most, not all of it
    more_taken = top_up_calibration(correct, np.r_[taken, picked[:1]], 20, seed=0)
    assert len(np.intersect1d(picked, more_taken)) == 19
    with pytest.raises(PipelineError, match="--calibration-images"):
        run(TrainOptions(calibration_images=-1))


def test_calibration_images_do_not_depend_on_whether_the_suite_runs(default_bundle, tmp_path):
    """The evaluation's images are set apart with ``--evaluate none`` too: the same calibration images, and
    so the same operating point, whether or not the attack suite runs; the top-up is drawn from the
    correctly classified images neither attacked nor evaluated, as many as asked.  The paper's tree, which
    has no operating point, gets none."""
    base = TrainOptions(weights=str(default_bundle / "weights.pt"), epochs=0, max_samples=150, evaluate_images=60,
                        calibration_images=100, progress=False)
    quick = run(replace(base, out=str(tmp_path / "quick")))
    silent = run(replace(base, evaluate="none", out=str(tmp_path / "none")))
    assert "evaluation" in quick and "evaluation" not in silent
    n_adv = quick["detection"]["n_test_adversarial"]
    assert n_adv < 100 and f"only {n_adv} held-out adversarials" in " ".join(quick["warnings"])
    test = load_dataset("digits", train=False)
    check_calibration_top_up(tmp_path / "quick", test, len(test), 100)
    splits = [json.loads((tmp_path / name / "split.json").read_text()) for name in ("quick", "none")]
    assert splits[0]["calibration"] == splits[1]["calibration"]
    assert quick["detection"]["threshold"] == silent["detection"]["threshold"]
    paper = run(replace(base, detector="paper", evaluate="none", out=str(tmp_path / "paper")))
    assert paper["detection"]["n_calibration_not_attacked"] == 0
    # A rerun over a bundle it wrote (one that holds its evaluation too) replaces it.
    again = run(replace(base, detector="paper", evaluate="none", out=str(tmp_path / "quick")))
    assert again["detection"]["detector"] == "paper" and load_bundle(tmp_path / "quick").sha256


def test_run_warnings_name_what_should_not_be_trusted():
    """Each warning fires on its own condition and only on it; the boundaries are where the messages say."""
    from training.pipeline import SMALL_SET, run_warnings

    fine = {"n_test_adversarial": SMALL_SET, "tpr_interval": [0.9, 0.97]}
    assert run_warnings(0.19, 10, fine, 1.0) == []  # a tenth of the way from chance to perfect; 1.0 flags scores of 1
    near_chance, small, nothing = (run_warnings(0.185, 10, fine, 0.5),
                                   run_warnings(0.9, 10, {**fine, "n_test_adversarial": SMALL_SET - 1}, 0.5),
                                   run_warnings(0.9, 10, fine, float(np.nextafter(1.0, 2.0))))
    assert len(near_chance) == len(small) == len(nothing) == 1
    assert "near chance (18.5% clean accuracy, 10 classes)" in near_chance[0]
    assert small[0].startswith("only 99 held-out adversarials") and "90%–97%" in small[0]
    assert nothing[0].startswith("the operating point flags nothing")
    assert run_warnings(0.56, 2, fine, 0.5) == []  # two classes: twice chance would be 100%, met by none
    assert "near chance" in run_warnings(0.54, 2, fine, 0.5)[0]


def test_clean_variants_are_what_the_detector_is_fitted_and_calibrated_on(default_bundle, tmp_path):
    """``--clean-variants``: typed names are read, the clean images go through exactly those changes
    (rows per calibration image: itself and each variant), and the evaluation knows them as seen."""
    args = build_parser().parse_args(["--clean-variants", "jpeg q30, noise sigma=0.05,JPEG q30"])
    assert options_from_args(args, "x").clean_variants == ("JPEG q30", "noise σ=0.05")
    assert build_parser().parse_args(["--clean-variants", "none"]).clean_variants == ()
    kept = build_parser().parse_args(["--clean-variants", "default, JPEG q30"]).clean_variants
    assert kept == (*CLEAN_VARIANTS, "JPEG q30")
    for bad in ("sharpen", "", " , "):  # an empty value (an unset shell variable) is not "none"
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--clean-variants", bad])
    report = run(TrainOptions(weights=str(default_bundle / "weights.pt"), epochs=0, max_samples=150,
                              clean_variants=("JPEG q30", "noise σ=0.05", "jpeg q30"), evaluate="none",
                              out=str(tmp_path / "b"), progress=False))
    assert list(report["detection"]["fitted_on"]["clean"]) == ["clean images", "JPEG q30", "noise σ=0.05"]
    assert seen_in_fitting(report) == ["JPEG q30", "noise σ=0.05"]
    detector = load_bundle(tmp_path / "b").detector
    detection = report["detection"]
    assert detection["n_calibration"] == detector.n_calibration_ == 3 * detection["n_calibration_images"]


def test_fit_attacks_are_the_adversarials_the_detector_is_fitted_on(default_bundle, tmp_path):
    """``--fit-attacks``: the detector's adversarial rows come from the named sources only, the report
    says so, and the evaluation marks only those attacks as seen in fitting."""
    from training.fitting import FIT_SOURCES, fit_attacks, seen_in_fitting

    assert options_from_args(build_parser().parse_args(["--fit-attacks", "one-step, SMALL,one-step"]),
                             "x").fit_attacks == ("one-step", "small")
    assert options_from_args(build_parser().parse_args([]), "x").fit_attacks is None
    for bad in ("fgsm", "", " , "):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--fit-attacks", bad])
    pgd8 = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10}
    assert list(fit_attacks("activations", pgd8)) == list(fit_attacks("activations", pgd8, FIT_SOURCES[::-1]))
    with pytest.raises(ValueError, match="some of path, one-step, small"):
        fit_attacks("activations", pgd8, ["fgsm"])
    report = run(TrainOptions(weights=str(default_bundle / "weights.pt"), epochs=0, max_samples=150,
                              fit_attacks=("one-step",), evaluate="none", out=str(tmp_path / "b"), progress=False))
    fitted = report["detection"]["fitted_on"]
    assert list(fitted["adversarial"]) == list(fitted["attacks"]) == ["fgsm"]
    assert fitted["adversarial"]["fgsm"] > 0
    suite = [{"label": "FGSM", "attack": "fgsm", "params": {"eps": report["attack"]["eps"]}},
             {"label": "PGD", "attack": "pgd", "params": {k: report["attack"][k] for k in ("eps", "alpha", "steps")}}]
    assert seen_in_fitting(report, suite)[-1:] == ["FGSM"] and "PGD" not in seen_in_fitting(report, suite)
    n_clean = len(fitted["clean"]) * report["detection"]["n_fit_images"]
    assert report["detection"]["n_fit"] == n_clean + fitted["adversarial"]["fgsm"]


def test_bad_requests_fail_before_any_work(tmp_path):
    with pytest.raises(PipelineError, match="no --weights"):
        run(TrainOptions(epochs=0, out=str(tmp_path / "a"), progress=False))
    with pytest.raises(PipelineError, match="--depth applies to wrn only"):
        run(TrainOptions(model="cnn", depth=16, out=str(tmp_path / "b"), progress=False))
    with pytest.raises(PipelineError, match="--mean and --std together"):
        run(TrainOptions(mean=[0.5], out=str(tmp_path / "c"), progress=False))
    with pytest.raises(PipelineError, match="test-fraction"):
        run(TrainOptions(test_fraction=1.0, out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--train-eps sets --adversarial-training, which was not given"):
        run(TrainOptions(train_eps=0.1, out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--train-steps sets --adversarial-training"):
        run(TrainOptions(train_steps=3, out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--train-steps applies to --adversarial-training pgd"):
        run(TrainOptions(adversarial_training="fast", train_steps=3, out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--clean-variants is for detectors with an operating point"):
        run(TrainOptions(detector="paper", clean_variants=("JPEG q30",), out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--clean-variants: unknown shift 'sharpen'"):
        run(TrainOptions(clean_variants=("sharpen",), out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="a sequence of names, not one string"):
        run(TrainOptions(clean_variants="JPEG q30", out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--fit-attacks is for detectors fitted on both phases"):
        run(TrainOptions(detector="paper", fit_attacks=("path",), out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--fit-attacks names some of path, one-step, small, got fgsm"):
        run(TrainOptions(fit_attacks=("fgsm",), out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--fit-attacks names some of"):
        run(TrainOptions(fit_attacks=(), out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="fit_attacks is a sequence of names"):
        run(TrainOptions(fit_attacks="path", out=str(tmp_path / "d"), progress=False))
    with pytest.raises(PipelineError, match="--epochs is 0"):
        run(TrainOptions(adversarial_training="fast", epochs=0, weights=str(tmp_path / "x.pt"),
                         out=str(tmp_path / "d"), progress=False))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a bundle"):  # never replaces a directory of other files
        run(TrainOptions(out=str(tmp_path / "project"), progress=False))
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(PipelineError, match="do not fit"):
        run(TrainOptions(weights=str(tmp_path / "wrong.pt"), out=str(tmp_path / "e"), progress=False))
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_training_tiny_sets(digits_train):
    """A four-step schedule (OneCycleLR divides by zero there) and a last batch of one image, on a
    ResNet-18 whose last batch norm sees 1×1 maps on 8×8 inputs (it cannot train on one value)."""
    from detector import build_classifier
    from training.classifier import train_classifier

    for n in (64, 33):  # 4 batches of 16; 2 batches of 16 and one of 1
        model = build_classifier("resnet18", 10, 1)
        before = [p.detach().clone() for p in model.parameters()]
        train_classifier(model, digits_train.subset(range(n)), epochs=1, batch_size=16, progress=False)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_radii_are_printed_as_given():
    from training.report import pixel_value

    assert pixel_value(8 / 255) == "8/255" and pixel_value(2 / 255) == "2/255"
    assert pixel_value(0.2) == "0.2" and pixel_value(0.05) == "0.05"  # not "51/255" for the digits default
    assert pixel_value(0.5 / 255) == "0.5/255"
    assert pixel_value(0.123456) == "0.1235"


def test_attack_defaults_depend_on_the_data():
    paper = attack_settings(TrainOptions(data="cifar10"))
    assert (paper.eps, paper.alpha, paper.steps, paper.defaults) == (8 / 255, 2 / 255, 10, "paper")
    assert attack_settings(TrainOptions(data="npz:/x")).eps == 8 / 255
    given = attack_settings(TrainOptions(data="digits", eps=0.2))
    assert (given.eps, given.alpha, given.steps) == (0.2, 0.05, 10)  # α = ε/4 when only ε is given
    assert attack_settings(TrainOptions(eps=0.1, alpha=0.01, steps=3)).defaults == "given"
    with pytest.raises(PipelineError, match="l2 needs --eps"):
        attack_settings(TrainOptions(norm="l2"))


def test_roc_rates_read_off_the_polyline():
    fpr = np.array([0.0, 0.0, 0.12, 0.2, 1.0])
    tpr = np.array([0.0, 0.0, 0.5, 0.8, 1.0])
    tpr_at, tnr_at = roc_rates(fpr, tpr)
    assert tpr_at == pytest.approx(0.5 * 0.05 / 0.12)
    assert tnr_at == pytest.approx(1 - (0.2 + 0.8 * 0.15 / 0.2))
    assert roc_rates(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0])) == (1.0, 1.0)  # perfect
    assert roc_rates(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == pytest.approx((0.05, 0.05))  # chance


# --- every built-in architecture, npz / folder / torchvision-format data --------------------------


def write_two_digits_rgb(root: Path, size: int, n_train: int = 160, n_test: int = 80) -> Path:
    """Real digits 0 and 1, resized to ``size``×``size`` RGB, as an npz folder: every architecture
    learns them in a few epochs (VGG-11 needs 32×32 inputs, the others run on 8×8)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        data = load_dataset("digits", train=split == "train")
        keep = torch.isin(data.labels, torch.tensor([0, 1])).nonzero().flatten()[:n]
        x = nn.functional.interpolate(data.images[keep].float(), size=(size, size), mode="bilinear")
        x = x.repeat(1, 3, 1, 1).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.savez(root / f"digits01_{split}.npz", x=x, y=data.labels[keep].numpy())
    (root / "classes.txt").write_text("zero\none\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "wrn", "resnet18", "vgg11", "densenet121"])
def test_every_builtin_model(model, tmp_path):
    """Each architecture trains, is attacked along the path, gets a detector, and round-trips
    through the bundle (a WideResNet-10-1 stands in for WRN-28-4, on the CPU)."""
    data = write_two_digits_rgb(tmp_path / "data", size=32 if model == "vgg11" else 8)
    out = tmp_path / model
    extra = {"depth": 10, "width": 1} if model == "wrn" else {"width": 8} if model == "cnn" else {}
    # Enough optimiser steps (50) for batch norm's running statistics to settle: after a dozen,
    # eval-mode logits are in the hundreds, saturated, and PGD gets no gradient to follow.
    report = run(TrainOptions(model=model, data=f"npz:{data}", epochs=5, batch_size=16, lr=0.05,
                              eps=0.3, alpha=0.15, steps=3, out=str(out), progress=False, **extra))
    check_report(report, steps=3)
    check_bundle(out, report)
    assert report["data"]["classes"] == ["zero", "one"]
    assert report["classifier"]["model_config"] == ({"depth": 10, "width": 1} if model == "wrn" else extra)
    assert report["classifier"]["clean_accuracy"] > 0.9
    assert report["attack"]["success_rate"] > 0.25
    bundle = load_bundle(out)
    test = load_dataset(f"npz:{data}", train=False)
    assert accuracy(bundle.model, test) == pytest.approx(report["classifier"]["clean_accuracy"])


def test_folder_dataset(tmp_path, capsys):
    """``folder:PATH`` (ImageFolder layout with train/ and test/) of real digit images as PNG files."""
    from PIL import Image

    root = tmp_path / "digits_png"
    for split, n in (("train", 600), ("test", 200)):
        data = load_dataset("digits", train=split == "train")
        for i in range(n):
            folder = root / split / data.classes[int(data.labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i, 0].numpy(), mode="L").save(folder / f"{i}.png")
    out = tmp_path / "out"
    report = run(TrainOptions(data=f"folder:{root}", epochs=10, eps=0.3, alpha=0.1, steps=5, out=str(out),
                              progress=False))
    check_report(report, steps=5)
    check_bundle(out, report)
    assert report["data"]["input_shape"] == [1, 8, 8] and report["data"]["n_test"] == 200
    assert report["classifier"]["clean_accuracy"] > 0.9
    # --image-size resizes a folder's images (and says so); other data refuses it
    resized = load_dataset(f"folder:{root}", train=False, image_size=(12, 16))
    assert resized.input_shape == (1, 12, 16) and len(resized) == 200
    train, _, _, _ = load_splits(TrainOptions(data=f"folder:{root}", image_size=[10]))
    assert train.input_shape == (1, 10, 10)
    assert "images: 10×10 pixels, 1 channel (--image-size)" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="folder: data only"):
        load_splits(TrainOptions(data="digits", image_size=[10]))
    with pytest.raises(PipelineError, match="8×1100 pixels; a bundle takes at most 1024 on a side: give --image-size"):
        load_splits(TrainOptions(data=f"folder:{root}", image_size=[8, 1100]))  # refused before any training
    # A bundle fitted on resized folder images is judged on them at that size.
    from training.evaluate import main as evaluate_main

    sized = tmp_path / "sized"
    run(TrainOptions(data=f"folder:{root}", image_size=[10], epochs=3, eps=0.3, alpha=0.1, steps=3,
                     max_samples=80, evaluate="none", out=str(sized), progress=False))
    assert load_bundle(sized).input_spec.height == 10
    assert evaluate_main(["--bundle", str(sized), "--suite", "shifts", "--max-images", "100", "--no-progress",
                          "--out", str(tmp_path / "sized-ev")]) == 0


def test_cifar10_in_torchvision_format(fake_cifar10, tmp_path):
    out = tmp_path / "out"
    report = run(TrainOptions(data="cifar10", data_dir=str(fake_cifar10), width=8, epochs=4,
                              batch_size=32, eps=0.25, alpha=0.1, steps=3, out=str(out), progress=False))
    check_report(report, steps=3)
    check_bundle(out, report)
    assert "torchvision format" in report["data"]["source"]
    assert (report["data"]["n_train"], report["data"]["n_test"]) == (200, 40)
    assert report["data"]["classes"] == list(CIFAR10_CLASSES)


def test_cifar10_nowhere_says_what_to_put_where(tmp_path):
    """Offline, with neither torchvision's folder nor the npz pair in --data-dir: the error names both,
    and what the npz files hold."""
    with pytest.raises(PipelineError) as refused:
        run(TrainOptions(data="cifar10", data_dir=str(tmp_path), out=str(tmp_path / "out"), progress=False))
    message = str(refused.value)
    assert "cifar-10-batches-py" in message and "--download" in message
    assert "cifar10_train.npz and cifar10_test.npz in --data-dir" in message and "uint8 x" in message
    assert not (tmp_path / "out").exists()


# --- the rebuilt CIFAR-10 in ../shared/data --------------------------------------------------------


@pytest.mark.slow
def test_cifar10_subset_from_shared_data(cifar10_npz, tmp_path):
    """Real CIFAR-10 on the CPU: a small CNN trained on 2,500 images, then the paper's stronger
    PGD (ε = 12/255, 20 steps) on 1,000 test images it gets right.
    ``--data cifar10 --data-dir ../shared/data`` finds the npz copy when torchvision's is absent.
    Measured (seeds 0 and 1): clean accuracy 55% / 54%, attack success 99%, detection accuracy
    67% / 68%, AUROC 0.71 / 0.75, mean κ peaking at step 2 and ending at 0.72× / 0.64× the peak."""
    out = tmp_path / "cifar"
    report = run(TrainOptions(data="cifar10", data_dir=str(cifar10_npz.parent), width=16,
                              train_samples=2500, test_samples=2500, epochs=10, max_samples=1000,
                              eps=12 / 255, alpha=2 / 255, steps=20, evaluate_images=150, out=str(out),
                              progress=False))
    check_report(report, steps=20)
    check_bundle(out, report)
    assert "npz copy" in report["data"]["source"]
    assert report["data"]["classes"] == list(CIFAR10_CLASSES)
    assert report["classifier"]["clean_accuracy"] > 0.4  # chance is 0.10
    assert report["attack"]["success_rate"] > 0.95
    assert report["attack"]["max_linf"] <= 12 / 255 + 1e-5
    det = report["detection"]
    assert det["accuracy"] > 0.6 and det["auroc"] > 0.65, det  # chance is 0.5, n_test ≈ 1,300
    # The operating point is set on 210 attacked images' clean copies and on correctly classified test
    # images outside the attacked and the evaluated ones (here all of those that are left), each
    # as it came and through every clean variant.
    assert det["n_calibration"] == (1 + len(CLEAN_VARIANTS)) * det["n_calibration_images"]
    assert det["n_calibration_images"] == 210 + det["n_calibration_not_attacked"]
    full_test = load_splits(TrainOptions(data="cifar10", data_dir=str(cifar10_npz.parent)))[1]  # the npz copy
    check_calibration_top_up(out, full_test, 2500, TrainOptions.calibration_images)
    assert det["n_calibration_not_attacked"] < TrainOptions.calibration_images - 210  # all that are left
    check_served_operating_point(out, full_test)
    tr = report["trajectory"]
    kappa = np.array(tr["mean_sharpness"])
    assert 1 <= tr["peak_step"] <= 6 and kappa.max() > 1.1 * kappa[0]  # rises towards the boundary
    assert kappa[-1] < 0.85 * kappa.max()  # and falls once past it
    assert tr["mean_loss"][-1] > tr["mean_loss"][tr["peak_step"]]


def test_compare_marks_the_attacks_each_detector_was_fitted_on(default_bundle, tmp_path):
    """``python -m training.compare``: one classifier, detectors side by side; a cell is starred where
    that detector was fitted on the attack (the paper's tree: its PGD only)."""
    from training.compare import compare

    base = TrainOptions(weights=str(default_bundle / "weights.pt"), epochs=0, max_samples=300, evaluate_images=60,
                        progress=False)
    table = compare(base, combinations=(("paper", None), ("activations", None)), workdir=tmp_path,
                    log=lambda message: None)
    head, *body = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    rows = {row[0].strip(): dict(zip([c.strip() for c in head], [c.strip() for c in row], strict=True))
            for row in body}
    assert set(rows) == {"paper", "activations"}
    fitted = {"FGSM L∞ 8/255", "PGD-10 L∞ 2/255", "PGD-10 L∞ 8/255"}
    for detector, seen in (("paper", {"PGD-10 L∞ 8/255"}), ("activations", fitted)):
        starred = {column for column, cell in rows[detector].items() if cell.endswith("%*")}
        assert starred == seen, detector
    assert "\\* an attack that detector was fitted on" in table


def test_compare_shows_a_dash_where_an_attack_had_no_rate():
    """An attack that succeeded on no image has a detection rate of null in evaluation.json."""
    from training.compare import _pct

    assert _pct({"rate": None, "low": None, "high": None, "n": 0}) == "–" and _pct({"rate": 0.5}) == "50%"


def test_commands_refuse_what_would_lose_data_before_any_work(default_bundle, tmp_path, capsys, monkeypatch):
    """An --out that would replace or break something of the user's, one that cannot be written, and values
    that cannot run are refused with an error line before training or attacking, and nothing is touched."""
    import shutil

    from detector import verify_bundle
    from training.compare import main as compare_main
    from training.evaluate import main as evaluate_main

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle, bundle)
    digest = verify_bundle(bundle)
    webapp = tmp_path / "webapp"  # a folder with a manifest.json that is not a bundle's
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my app"}')
    (webapp / "index.html").write_text("precious")
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    refused = [
        (main, ["--out", str(webapp)], "not a bundle"),
        (main, ["--out", "."], "working folder"),
        (main, ["--out", str(bundle / "sub")], "inside the bundle"),
        (main, ["--out", "afile/sub"], "cannot be written"),
        (trajectory_main, ["--out", str(bundle)], "bundle"),
        (evaluate_main, ["--bundle", str(bundle), "--out", str(bundle)], "--attach"),
        (evaluate_main, ["--bundle", str(bundle), "--out", str(bundle / "ev")], "inside the bundle"),
        (evaluate_main, ["--bundle", str(bundle), "--out", "afile"], "is a file"),
        (evaluate_main, ["--bundle", str(bundle), "--target-fpr", "1.5"], "--target-fpr"),
        (main, ["--arch", "byo_models:make_strict_net", "--arch-kwargs", '{"depth": 7}', "--out", "x"],
         "AssertionError: depth must be 18 or 34"),
    ]
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    for command, argv, message in refused:
        with pytest.raises(SystemExit) as stop:
            command([*argv, "--no-progress"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err, (argv, err)
    for command, argv in ((main, ["--batch-size", "0"]), (main, ["--width", "0"]), (main, ["--eps", "nan"]),
                          (main, ["--evaluate-images", "-5"]), (main, ["--seed", "-1"]),
                          (trajectory_main, ["--batch-size", "-3"]),
                          (evaluate_main, ["--bundle", str(bundle), "--eps", "0"]),
                          (evaluate_main, ["--bundle", str(bundle), "--batch-size", "0"])):
        with pytest.raises(SystemExit) as stop:  # argparse names the flag
            command(argv)
        assert stop.value.code == 2 and f"argument {argv[-2]}" in capsys.readouterr().err, argv
    monkeypatch.setenv("WORLD_SIZE", "abc")
    with pytest.raises(SystemExit) as stop:
        main(["--out", "y", "--no-progress"])
    assert stop.value.code == 2 and "WORLD_SIZE='abc'" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    from training.evaluate import default_out

    monkeypatch.chdir(bundle)  # --bundle . : the default evaluation folder goes beside it, not into it
    assert default_out(Path("."), "quick") == bundle.resolve().parent / "bundle-evaluation-quick"
    monkeypatch.chdir(tmp_path)
    assert compare_main(["--data", "bogus"]) == 2 and "unknown dataset" in capsys.readouterr().err
    assert compare_main(["--out", "afile/table.md"]) == 2 and "error" in capsys.readouterr().err
    assert (webapp / "index.html").read_text() == "precious" and verify_bundle(bundle) == digest
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
