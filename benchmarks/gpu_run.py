"""The GPU run, as one command: the paper's WRN-28-4 on CIFAR-10, the GPU benchmarks and the service on CUDA.

A GPU is lent for minutes, start-up included, so everything is prepared here and runs as one call::

    python -m benchmarks.gpu_run --data-dir DIR --out "$OUT"          # on the GPU machine
    python -m benchmarks.gpu_run --dry-run --data-dir DIR --out /tmp/x  # anywhere, on the CPU, in minutes

Steps, each a subprocess with its own time limit, in this order:

1. ``environment``: torch, CUDA and the device, written to ``environment.json``;
2. ``calibrate``: a short timed training pass of WRN-28-4 (bf16 autocast, channels-last, batch 512)
   that sizes the number of epochs to ``--train-seconds``;
3. ``train``: ``detector-train --model wrn --data cifar10`` with those epochs: the classifier, the PGD
   paths, the detector and Figure 1, in the bundle;
4. ``evaluate``: ``detector-evaluate --suite full`` on held-out images;
5. ``bench-overhead``, ``bench-kappa-pgd``, ``bench-service``: ``python -m benchmarks --device cuda``
   (item 1 at batch sizes up to 1024 in fp32 and bf16, items 2 and 3, and the service under load
   serving the WRN bundle), and ``bench-scaling``;
6. ``bench-overhead-every-layer``, ``fit-every-layer``, ``evaluate-every-layer``: what
   ``--detector every-layer`` costs on the device (item 1 on WRN-28-4), and that detector on the same
   classifier, fitted on 5,000 attacked images, judged by the quick suite on held-out images (in the
   archive, beside the default's), if the deadline leaves them their time.

A step starts only if the run's deadline (``--budget-s``, 11.5 minutes by default) leaves it its minimum
time, and is stopped at its own limit or at the deadline, whichever comes first (SIGTERM, then SIGKILL
10 s later: ``python -m benchmarks`` then stops the servers it started, and has written every item it
finished); what finished is kept. The benchmark steps are sized to their limits (item 1 with 3 samples a
cell and without the reference detectors, the service with 6 s of load per mode and a 10 s soak).
Each step's time and outcome go to ``summary.json`` and the printed summary, so that a later run can
move what did not fit. The figures that come back are copied flat into ``--out`` (a GPU lease returns
at most 8 files): ``summary.json``, ``gpu_run.log``, ``report.md``, ``evaluation.md``,
``figure1_trajectory.png``, ``BENCHMARKS.md`` and ``results.tar.gz`` (every JSON, Markdown and plot;
no weights).

``--dry-run`` runs the same steps on the CPU at toy sizes (WRN-10-1, 2,048 training images, two epochs,
the quick suite and quick benchmarks): the test suite runs it, so this script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Step", "main", "plan"]

REPO = Path(__file__).resolve().parents[1]
TRAIN_SIZE = 50_000
#: Seconds a step stopped at its limit gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 10.0


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: float  # stopped after this long
    min_s: float  # not started with less than this left
    needs: tuple[str, ...] = ()  # steps that must have passed
    result: dict = field(default_factory=dict)


def _entry(module: str, function: str = "main") -> list[str]:
    """A console script of the project as ``python -c`` (the project need not be installed there)."""
    return [sys.executable, "-c", f"import sys; from {module} import {function} as f; sys.exit(f(sys.argv[1:]))"]


_CALIBRATE = r"""
import json, sys, time, torch
from detector.datasets import load_dataset
from detector.models import build_classifier
from training.classifier import train_classifier
data_dir, depth, width, n, batch, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
train = load_dataset(f"npz:{data_dir}", train=True)
train = train.subset(torch.arange(min(n, len(train))))
model = build_classifier("wrn", 10, 3, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], {"depth": depth, "width": width})
train_classifier(model, train.subset(torch.arange(min(2 * batch, len(train)))), 1, batch_size=batch, device=device,
                 progress=False)  # compiles kernels, fills the allocator
if device.startswith("cuda"):
    torch.cuda.synchronize()
start = time.perf_counter()
train_classifier(model, train, 1, batch_size=batch, device=device, progress=False)
if device.startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps({"images_per_s": len(train) / (time.perf_counter() - start), "images": len(train)}))
"""

_ENVIRONMENT = r"""
import json, platform, sys, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "platform": platform.platform()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    dry = args.dry_run
    device = "cpu" if dry else args.device
    bundle = work / "wrn"

    def bench_options(folder: Path) -> list[str]:
        """``python -m benchmarks`` options that write results and the document to ``folder``."""
        return ["--device", device, "--results-dir", str(folder), "--out", str(folder / "BENCHMARKS.md"),
                "--wait-load", "0", "--quiet-cores", "0"]

    bench = bench_options(work / "benchmarks")
    bench_module = [sys.executable, "-m", "benchmarks"]
    common = ["--model", "wrn", "--data", "cifar10", "--data-dir", str(args.data_dir), "--device", device,
              "--evaluate", "none", "--no-progress", "--seed", str(args.seed)]
    # Enough images for the rebuilt CIFAR-10 too, where one epoch of WRN-10-1 on 512 images is near
    # chance and leaves the evaluation too few correctly classified ones to calibrate on.
    toy = ["--depth", "10", "--width", "1", "--train-samples", "2048", "--test-samples", "512"]
    if dry:
        common += toy
        train = common + ["--out", str(bundle), "--epochs", "2", "--batch-size", "64", "--max-samples", "256"]
    else:
        train = common + ["--out", str(bundle), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                          "--max-samples", "2000"]
    # every-layer on the same classifier and 5,000 fitting images: what decides the default detector
    # (docs/RESULTS.md, "More fitting images"); last, so that it takes only time the rest left.
    every_layer = work / "wrn-every-layer"
    fit_every_layer = common + ["--weights", str(bundle / "weights.pt"), "--epochs", "0", "--detector", "every-layer",
                                "--max-samples", "256" if dry else "5000", "--out", str(every_layer)]
    evaluate = ["--bundle", str(bundle), "--device", device, "--no-progress", "--out", str(work / "evaluation")]
    evaluate += ["--suite", "quick", "--max-images", "60"] if dry else ["--suite", "full", "--max-images", "500"]
    evaluate_every_layer = ["--bundle", str(every_layer), "--device", device, "--no-progress",
                            "--out", str(work / "evaluation-every-layer"), "--suite", "quick",
                            "--max-images", "60" if dry else "500"]
    steps = [Step("environment", [sys.executable, "-c", _ENVIRONMENT], 60, 5)]
    if not dry:
        steps.append(Step("calibrate", [sys.executable, "-c", _CALIBRATE, str(args.data_dir), "28", "4", "10240",
                                        str(args.batch_size), device], 90, 20))
    steps += [
        Step("train", _entry("training.cli") + train, 30 * 60 if dry else args.train_seconds + 150, 60 if dry else 200),
        Step("evaluate", _entry("training.evaluate") + evaluate, 300 if dry else 150, 20 if dry else 60, ("train",)),
        Step("bench-overhead", bench_module + bench + ["--only", "overhead"]
             # Sized to its limit: 16 cells of 3 samples, without the reference detectors (≈ 3 s a cell).
             + (["--quick", "--archs", "cnn"] if dry else ["--amp", "none,bf16", "--batch-sizes", "1,32,256,1024",
                                                           "--repeats", "3", "--no-reference-detectors"]),
             300 if dry else 120, 10 if dry else 45),
        Step("bench-kappa-pgd", bench_module + bench + ["--only", "kappa,pgd"] + (["--quick"] if dry else []),
             300 if dry else 90, 10 if dry else 40),
        Step("bench-service", bench_module + bench + ["--only", "service", "--bundle", str(bundle)]
             + (["--quick"] if dry else ["--service-seconds", "6", "--service-soak-seconds", "10",
                                         "--service-clients", "64"]),
             300 if dry else 120, 10 if dry else 60, ("train",)),
        # Per-image cost of a ResNet-50 forward and forward+backward pass: docs/DEPLOY.md's sizing table.
        Step("bench-scaling", [sys.executable, "-m", "benchmarks.scaling", "--device", device, "--json",
                               str(work / "benchmarks" / "scaling.json")]
             + (["--batch-size", "2", "--repeats", "1"] if dry else ["--batch-size", "128", "--amp", "bf16"]),
             120 if dry else 60, 5 if dry else 20),
        # What every-layer's hooks on every convolution cost on the device (its own results folder: the
        # default detector's item 1 above is kept as it is).
        Step("bench-overhead-every-layer", bench_module + bench_options(work / "benchmarks-every-layer")
             + ["--only", "overhead", "--detector", "every-layer"]
             + (["--quick", "--archs", "cnn"] if dry else ["--archs", "wrn", "--amp", "none,bf16",
                                                           "--batch-sizes", "32,256,1024", "--repeats", "3",
                                                           "--no-reference-detectors"]),
             300 if dry else 90, 10 if dry else 40),
        Step("fit-every-layer", _entry("training.cli") + fit_every_layer, 600 if dry else 240, 20 if dry else 60,
             ("train",)),
        Step("evaluate-every-layer", _entry("training.evaluate") + evaluate_every_layer, 300 if dry else 120,
             20 if dry else 45, ("fit-every-layer",)),
    ]
    return steps


def _log(message: str, log_file) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    log_file.write(line + "\n")
    log_file.flush()


def run_step(step: Step, deadline: float, log_file, env: dict[str, str]) -> dict:
    left = deadline - time.monotonic()
    if left < step.min_s:
        return {"status": "skipped", "why": f"{left:.0f} s left, it needs at least {step.min_s:.0f} s", "seconds": 0.0}
    limit = max(1.0, min(step.limit_s, left - STOP_GRACE_S))  # room for a stopped step to wind down
    _log(f"{step.name}: started (limit {limit:.0f} s)", log_file)
    started = time.monotonic()
    with subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        try:
            output, _ = proc.communicate(timeout=limit)
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            # SIGTERM first: the step's own exit path stops the servers it started and keeps what it has
            # measured (python -m benchmarks writes its results after every item); SIGKILL if it lingers.
            proc.terminate()
            try:
                output, _ = proc.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            status = "stopped at its time limit"
    seconds = time.monotonic() - started
    log_file.write(output)
    _log(f"{step.name}: {status} in {seconds:.0f} s", log_file)
    return {"status": status, "seconds": round(seconds, 1), "tail": output[-2000:]}


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def collect(work: Path, out: Path) -> list[str]:
    """Copy the figures flat into ``out`` and pack every text and plot file (no weights) into one archive."""
    copied = []
    for source in (work / "wrn" / "report.md", work / "evaluation" / "evaluation.md",
                   work / "wrn" / "figure1_trajectory.png", work / "benchmarks" / "BENCHMARKS.md"):
        if source.is_file():
            shutil.copy2(source, out / source.name)
            copied.append(source.name)
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and path.suffix in (".json", ".md", ".png", ".csv", ".log"):
                tar.add(path, arcname=str(path.relative_to(work)))
    copied.append("results.tar.gz")
    return copied


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a folder with cifar10_train.npz and cifar10_test.npz")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-run", help="where the figures go (default $OUT)")
    p.add_argument("--work", default=None, help="where the bundle and all results are written (default: a temp dir)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes, in a few minutes")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=690.0, help="stop everything after this long (default 11.5 min)")
    p.add_argument("--train-seconds", type=float, default=300.0,
                   help="training time the epochs are sized to from the calibration (default 5 min)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Everything is written outside --out: a lease returns only a few flat files from there.
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-run-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    summary: dict = {"command": " ".join(["python -m benchmarks.gpu_run", *(argv if argv is not None else sys.argv[1:])]),
                     "dry_run": args.dry_run, "budget_s": args.budget_s, "steps": []}
    steps = plan(args, work)
    passed: set[str] = set()
    with open(out / "gpu_run.log", "w") as log_file:
        for step in steps:
            missing = [n for n in step.needs if n not in passed]
            if missing:
                result = {"status": "skipped", "why": f"needs {', '.join(missing)}", "seconds": 0.0}
            else:
                result = run_step(step, deadline, log_file, env)
            if result["status"] == "passed":
                passed.add(step.name)
                value = _last_json(result.get("tail", ""))
                if step.name == "environment" and value:
                    summary["environment"] = value
                if step.name == "calibrate" and value:
                    epochs = max(2, min(args.max_epochs, int(args.train_seconds * value["images_per_s"] / TRAIN_SIZE)))
                    summary["calibration"] = {**value, "epochs": epochs}
                    train = next(s for s in steps if s.name == "train")
                    train.argv += ["--epochs", str(epochs)]
            summary["steps"].append({"name": step.name, **{k: v for k, v in result.items() if k != "tail"}})
            step.result = result
        summary["seconds"] = round(time.monotonic() - started, 1)
        report = work / "wrn" / "report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            summary["wrn"] = {"clean_accuracy": r["classifier"]["clean_accuracy"], "epochs": r["classifier"]["epochs"],
                              "detection_auroc": r["detection"]["auroc"], "timing_s": r["timing"]["seconds"]}
        summary["files"] = collect(work, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        _log("summary: " + "; ".join(f"{s['name']} {s['status']} ({s['seconds']:.0f} s)" for s in summary["steps"]),
             log_file)
        if "wrn" in summary:
            _log(f"WRN: clean accuracy {summary['wrn']['clean_accuracy']:.3f} after {summary['wrn']['epochs']} epochs",
                 log_file)
    return 0 if all(s["status"] == "passed" for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
