"""The GPU run's one command, rehearsed on the CPU at toy sizes, and the data it carries to the GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def fake_cifar10(root: Path, n_train: int = 1024, n_test: int = 512) -> Path:
    """CIFAR-10's npz layout with learnable images: each class a colour, plus noise and a stripe."""
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 225, (10, 3))
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = rng.integers(0, 10, n)
        x = colours[y][:, None, None, :] + rng.normal(0, 25, (n, 32, 32, 3))
        x[np.arange(n), y * 3] = 255  # a class-dependent row
        np.savez(root / f"cifar10_{split}.npz", x=np.clip(x, 0, 255).astype(np.uint8), y=y.astype(np.int64))
    return root


@pytest.mark.slow
def test_dry_run_goes_through_every_step_and_returns_the_figures(tmp_path):
    data = fake_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "--dry-run", "--data-dir", str(data),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1500)
    summary = json.loads((out / "summary.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert proc.returncode == 0 and set(statuses.values()) == {"passed"}, (statuses, proc.stdout[-3000:])
    assert list(statuses) == ["environment", "train", "evaluate", "bench-overhead", "bench-kappa-pgd",
                              "bench-service", "bench-scaling", "bench-overhead-every-layer", "fit-every-layer",
                              "evaluate-every-layer"]
    assert all(s["seconds"] > 0 for s in summary["steps"])  # each step reports its own time
    assert summary["wrn"]["epochs"] == 2 and 0.0 <= summary["wrn"]["clean_accuracy"] <= 1.0
    # What comes back from a lease: at most 8 files, flat.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.json", "gpu_run.log", "report.md", "evaluation.md", "figure1_trajectory.png",
                            "BENCHMARKS.md", "results.tar.gz"])
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "wrn/report.json" in names and "evaluation/evaluation.json" in names
    assert "wrn-every-layer/report.json" in names and "evaluation-every-layer/evaluation.json" in names
    assert "benchmarks-every-layer/BENCHMARKS.md" in names
    assert not any(name.endswith(".pt") for name in names)  # no weights travel back
    bench = (out / "BENCHMARKS.md").read_text()
    for title in ("1. Detection overhead", "2. ", "3. ", "4. "):
        assert f"### {title}" in bench, title


@pytest.mark.slow
def test_dry_run_passes_on_the_rebuilt_cifar10_too(cifar10_npz, tmp_path):
    """On real images a toy classifier is weak (31% after its two epochs): the rehearsal must still leave
    the evaluation enough correctly classified images, as it does with the learnable fake above."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "--dry-run", "--data-dir", str(cifar10_npz),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=1500)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert proc.returncode == 0 and set(statuses.values()) == {"passed"}, (statuses, proc.stdout[-3000:])


def test_a_step_that_does_not_fit_the_budget_is_skipped_and_said_so(tmp_path):
    from benchmarks.gpu_run import Step, run_step

    with open(tmp_path / "log", "w") as log:
        result = run_step(Step("big", [sys.executable, "-c", "pass"], limit_s=60, min_s=30), deadline=0.0,
                          log_file=log, env={})
        assert result["status"] == "skipped" and "needs at least 30 s" in result["why"]
        import time

        result = run_step(Step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], limit_s=1, min_s=0),
                          deadline=time.monotonic() + 60, log_file=log, env={})
        assert result["status"] == "stopped at its time limit" and result["seconds"] < 10
        # Stopped with SIGTERM first: its exit path runs (python -m benchmarks stops its servers there).
        wound_down = tmp_path / "wound-down"
        script = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
                  f"try:\n    time.sleep(30)\nfinally:\n    open({str(wound_down)!r}, 'w').write('yes')\n")
        result = run_step(Step("graceful", [sys.executable, "-c", script], limit_s=2, min_s=0),
                          deadline=time.monotonic() + 60, log_file=log, env={})
        assert result["status"] == "stopped at its time limit" and wound_down.read_text() == "yes"


def test_the_gpu_steps_options_are_ones_their_commands_take(tmp_path):
    """The dry run takes the CPU's options; the GPU's own (sizes, repeats, soak) are parsed here, so that a
    lease is not spent on a typo."""
    from benchmarks import run_all, scaling
    from benchmarks.gpu_run import build_parser, plan
    from training.cli import build_parser as train_parser
    from training.evaluate import build_parser as evaluate_parser

    steps = plan(build_parser().parse_args(["--data-dir", str(tmp_path)]), tmp_path / "work")
    parsers = {"bench-overhead": run_all.build_parser(), "bench-kappa-pgd": run_all.build_parser(),
               "bench-service": run_all.build_parser(), "bench-overhead-every-layer": run_all.build_parser(),
               "bench-scaling": scaling.build_parser(), "train": train_parser(), "fit-every-layer": train_parser(),
               "evaluate": evaluate_parser(), "evaluate-every-layer": evaluate_parser()}
    for step in steps:
        if step.name in parsers:  # [python, -m module | -c entry, *options]
            parsers.pop(step.name).parse_args(step.argv[3:])
    assert not parsers, f"steps not in the plan: {sorted(parsers)}"


def test_cifar_packed_for_the_trip_comes_back_with_its_labels_and_nearly_its_pixels(tmp_path):
    from benchmarks.gpu_carry import pack, unpack

    data = fake_cifar10(tmp_path / "data", n_train=1100, n_test=60)  # more than one mosaic, and a partial one
    report = pack(data, tmp_path / "packed")
    unpack(tmp_path / "packed", tmp_path / "back")
    for split in ("train", "test"):
        with np.load(data / f"cifar10_{split}.npz") as a, np.load(tmp_path / "back" / f"cifar10_{split}.npz") as b:
            assert b["x"].shape == a["x"].shape and np.array_equal(b["y"], a["y"])
            mae = np.abs(b["x"].astype(int) - a["x"]).mean()
        assert mae == pytest.approx(report[split]["mae"], abs=1e-6)
    assert report["train"]["bytes"] < 1100 * 32 * 32 * 3  # smaller than the raw pixels
