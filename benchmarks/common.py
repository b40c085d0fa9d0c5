"""Shared machinery: interleaved timing, statistics, machine description, devices, the reference tree.

Timing rules (every benchmark follows them):

- the methods compared in one table run in the same process on the same model and inputs,
  interleaved (A B C … then … C B A, alternately) so that drift of a shared machine hits all alike;
- one *sample* is ``number`` consecutive calls divided by ``number``; ``number`` is calibrated once
  on the first (baseline) method so that a sample lasts at least ``min_sample_s``, and every
  method uses the same ``number``;
- ratios are taken per repeat (method / baseline of the same round) and summarised by their median
  and interquartile range; absolute times likewise (median, IQR, min–max);
- on CUDA every sample is bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# CIFAR-10 channel statistics: the big models get CIFAR-shaped inputs and normalisation.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# -------------------------------------------------------------------------------------------------
# Results
# -------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A table of a section: ``columns`` and rows of already formatted cells (or raw values)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table {self.title!r} has {len(self.columns)} columns")
        self.rows.append(list(cells))


@dataclass
class Target:
    """A target of the issue and whether this run met it (``None``: not measured)."""

    name: str
    target: str
    measured: str
    met: bool | None
    note: str = ""


@dataclass
class Section:
    """What one benchmark returns: text, tables, targets and raw numbers for the JSON dump."""

    key: str
    title: str
    description: str
    command: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None


# -------------------------------------------------------------------------------------------------
# Statistics and formatting
# -------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        values = [float(v) for v in values]
        if not values:
            raise ValueError("no values")
        q1, q3 = (np.quantile(values, [0.25, 0.75]).tolist() if len(values) > 1 else (values[0], values[0]))
        return cls(statistics.median(values), q1, q3, min(values), max(values), len(values))

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max,
                "n": self.n}


def fmt_seconds(s: float) -> str:
    """A duration with a unit that keeps 3 significant digits."""
    if not math.isfinite(s):
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_time_stats(st: Stats) -> str:
    """``median (IQR q1–q3)`` of durations."""
    return f"{fmt_seconds(st.median)} ({fmt_seconds(st.q1)}–{fmt_seconds(st.q3)})"


def fmt_ratio_stats(st: Stats, digits: int = 3) -> str:
    return f"{st.median:.{digits}f} ({st.q1:.{digits}f}–{st.q3:.{digits}f})"


def fmt_rate(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def fmt_factor(x: float) -> str:
    if not math.isfinite(x):
        return "—"
    if x >= 100:
        return f"{x:,.0f}×"
    return f"{x:.3g}×"


# -------------------------------------------------------------------------------------------------
# Devices and precision
# -------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    from detector.devices import DeviceError
    from detector.devices import resolve_device as resolve

    try:
        return resolve(name)
    except DeviceError as exc:
        raise SystemExit(f"--device: {exc}") from exc


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


AMP_DTYPES = {"none": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """Autocast for the model (ψ is lifted to float32 by detector.features either way)."""
    dtype = AMP_DTYPES[amp or "none"]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads`` (default: every core this process may use)."""
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# -------------------------------------------------------------------------------------------------
# Timing
# -------------------------------------------------------------------------------------------------
def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    min_sample_s: float,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    max_number: int = 10_000,
    same_number: bool = True,
) -> tuple[dict[str, list[float]], int | dict[str, int]]:
    """Per-call seconds of every method, ``repeats`` samples each, interleaved.

    Returns ``(samples, number)``: ``samples[name][r]`` is the mean seconds per call of the r-th
    sample, over ``number`` consecutive calls.  With ``same_number`` (the default) ``number`` is
    calibrated on the first (baseline) method and shared; otherwise each method gets its own and
    ``number`` is a dict.  Rounds alternate the order (A B C, C B A, …) so linear drift cancels in
    pairs.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            sync()

    def calibrate(name: str) -> int:
        sync()
        t0 = time.perf_counter()
        fns[name]()
        sync()
        one = max(time.perf_counter() - t0, 1e-7)
        return int(min(max_number, max(1, math.ceil(min_sample_s / one))))

    if same_number:
        shared = calibrate(names[0])
        numbers = {name: shared for name in names}
    else:
        numbers = {name: calibrate(name) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()  # once (it takes ~0.1 s with torch loaded); during samples the collector is off
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                fn, number = fns[name], numbers[name]
                gc.disable()
                sync()
                start = time.perf_counter()
                for _ in range(number):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) / number)
                if gc_was_enabled:
                    gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, (numbers[names[0]] if same_number else numbers)


#: Tensor operations that only re-describe memory (views): no kernel runs.
_NO_KERNEL = frozenset({
    "alias", "as_strided", "chunk", "detach", "expand", "expand_as", "flatten", "lift_fresh", "narrow", "numpy_T",
    "permute", "reshape", "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind",
    "unflatten", "unsqueeze", "view", "view_as", "_reshape_alias", "_unsafe_view"})
#: Conversions that run no kernel when they return their input unchanged (already of that dtype, device, layout).
_CONVERSIONS = frozenset({"contiguous", "resolve_conj", "resolve_neg", "to", "type_as"})


def count_operations(fn: Callable[[], Any]) -> int:
    """How many tensor operations one call of ``fn`` dispatches, views and conversions that return their
    input unchanged left out: each is at least one kernel launch on an accelerator, where at small batches
    the launches, not the arithmetic, can set the time.  Nearly the same count on every device: on the
    CPU a copy to the host returns its input and is not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in _NO_KERNEL and not (name in _CONVERSIONS and args and out is args[0]):
                Counter.count += 1
            return out

    with Counter():
        fn()
    return Counter.count


def ratios(samples: dict[str, list[float]], name: str, baseline: str) -> Stats:
    """Per-round ratio ``name / baseline``."""
    return Stats.of([a / b for a, b in zip(samples[name], samples[baseline])])


# -------------------------------------------------------------------------------------------------
# Machine description
# -------------------------------------------------------------------------------------------------
def load_average() -> tuple[float, float, float]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (float("nan"),) * 3  # type: ignore[return-value]


def wait_for_low_load(threshold: float, max_wait_s: float, poll_s: float = 30.0, log=print) -> tuple[float, float, float]:
    """Wait (up to ``max_wait_s``) until the 1-minute load average is below ``threshold``."""
    deadline = time.monotonic() + max_wait_s
    load = load_average()
    while load[0] >= threshold and time.monotonic() < deadline:
        log(f"load average {load} ≥ {threshold}: waiting {poll_s:.0f} s for the machine to calm down")
        time.sleep(poll_s)
        load = load_average()
    if load[0] >= threshold:
        log(f"load average still {load} after waiting {max_wait_s:.0f} s: running anyway (recorded)")
    return load


@dataclass
class CpuSnapshot:
    """Busy CPU seconds of the whole machine and of this process (with its reaped children)."""

    t: float
    machine: float
    own: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
            busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        return cls(time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system)


def foreign_cores(a: CpuSnapshot, b: CpuSnapshot) -> float:
    """Cores that OTHER processes kept busy on average between two snapshots."""
    if b.t <= a.t:
        return float("nan")
    return max(0.0, ((b.machine - a.machine) - (b.own - a.own)) / (b.t - a.t))


def wait_for_quiet_machine(max_cores: float, max_wait_s: float, window_s: float = 10.0, log=print) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``max_cores`` over ``window_s``.

    Unlike the load average this ignores our own CPU use (the previous section), so it can be
    checked between sections.  Returns the last measured foreign load in cores.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        a = CpuSnapshot.take()
        time.sleep(window_s)
        cores = foreign_cores(a, CpuSnapshot.take())
        if not cores >= max_cores or time.monotonic() >= deadline:  # nan counts as quiet
            if cores >= max_cores:
                log(f"other processes still use {cores:.2f} cores: running anyway (recorded)")
            return cores
        log(f"other processes use {cores:.2f} cores (≥ {max_cores}): waiting")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine_info(device: torch.device) -> dict[str, Any]:
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info: dict[str, Any] = {
        "date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cores visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory (GiB)": mem_gib,
        "torch threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": _version("scikit-learn"),
        "adversarial-robustness-toolbox": _version("adversarial-robustness-toolbox"),
        "httpx": _version("httpx"),
        "uvicorn": _version("uvicorn"),
        "uncanny-detector": _version("uncanny-detector"),
        "git commit": (_git("rev-parse", "--short", "HEAD") or "?") + (" (+ uncommitted changes)" if _git("status", "--porcelain") else ""),
    }
    return info


# -------------------------------------------------------------------------------------------------
# Models and the reference detector tree
# -------------------------------------------------------------------------------------------------
def cifar_model(arch: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """``arch`` with CIFAR-10's shape and normalisation, randomly initialised (timing only), eval mode."""
    from detector import build_classifier

    torch.manual_seed(seed)
    return build_classifier(arch, 10, 3, CIFAR_MEAN, CIFAR_STD).to(device).eval()


def cifar_batch(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels in [0, 1] of CIFAR's shape and random labels (timing only)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x.to(device), y.to(device)


_DIGITS_CACHE: dict[str, Any] = {}


def digits_model(quick: bool = False) -> tuple[torch.nn.Module, Any]:
    """The small CNN trained for real on scikit-learn's digits (as the test suite does) and the test set."""
    key = f"model-{quick}"
    if key not in _DIGITS_CACHE:
        from detector import build_classifier, load_dataset
        from training.classifier import train_classifier

        train = load_dataset("digits", train=True)
        test = load_dataset("digits", train=False)
        torch.manual_seed(0)
        mean, std = train.channel_stats()
        model = build_classifier("cnn", train.num_classes, 1, mean, std)
        train_classifier(model, train, epochs=2 if quick else 8, batch_size=64, lr=0.05, progress=False)
        _DIGITS_CACHE[key] = (model.eval(), test)
    return _DIGITS_CACHE[key]


def reference_detector(source: str = "digits", num_classes: int = 10, quick: bool = False):
    """A fitted, calibrated :class:`UncannyValleyDetector` whose tree cost is representative.

    ``source="digits"``: fitted on real ψ: the digits CNN above, its test images (clean) and their
    PGD-10 adversarials (ε = 0.3, the pipeline's digits setting), 50:50.
    ``source="random"``: fitted on random ψ of dimension ``num_classes`` (fast; smoke tests).
    """
    from detector import UncannyValleyDetector, analyze, pgd

    key = f"det-{source}-{num_classes}-{quick}"
    if key in _DIGITS_CACHE:
        return _DIGITS_CACHE[key]
    if source == "random":
        rng = np.random.default_rng(0)
        psi = rng.gamma(0.5, 1.0, size=(400, num_classes))
        labels = (psi[:, 0] + rng.normal(0, 0.5, 400) > 0.5).astype(int)
        labels[:2] = [0, 1]
        det = UncannyValleyDetector().fit(psi, labels, kappa=psi.sum(1))
    elif source == "digits":
        if num_classes != 10:
            raise ValueError("the digits detector has 10 classes")
        model, test = digits_model(quick)
        n = 120 if quick else len(test)
        x, y = test.batch(slice(0, n))
        clean = analyze(model, x)
        result = pgd(model, x, y, eps=0.3, alpha=0.075, steps=10, record=True)
        psi = torch.cat([clean.psi, result.psi[:, -1]]).double().numpy()
        kappa = torch.cat([clean.sharpness, result.sharpness[:, -1]]).double().numpy()
        labels = np.r_[np.zeros(n, int), np.ones(n, int)]
        det = UncannyValleyDetector().fit(psi, labels, kappa=kappa)
    else:
        raise ValueError(f"unknown detector source {source!r}")
    _DIGITS_CACHE[key] = det
    return det


def tree_description(det) -> str:
    tree = det.estimator_
    return f"DecisionTreeClassifier(min_samples_leaf=5): depth {tree.get_depth()}, {tree.get_n_leaves()} leaves"


def reference_bundle(model: torch.nn.Module, device: torch.device, n: int = 256, seed: int = 0,
                     detector: str | None = None):
    """A detector of the kind ``detector`` (default :data:`detector.estimator.DEFAULT_DETECTOR`:
    curvature features and earlier-layer statistics from hooks in the same pass) on ``model``, as a
    :class:`detector.Bundle`: what ``Bundle.detect`` costs is what the service pays per batch.  Timing
    only: the layer statistics (for kinds that read earlier layers) come from ``n`` random CIFAR-shaped
    images labelled by the model, and the detector's classifier is fitted on them against their FGSM
    adversarials (real attack, real fit; its accuracy is not the point)."""
    from detector import Bundle, InputSpec, fgsm
    from detector.estimator import DEFAULT_DETECTOR, make_detector
    from detector.layers import gaussians_for

    det = make_detector(detector or DEFAULT_DETECTOR, random_state=seed)
    x, _ = cifar_batch(n, device, seed=seed)
    with torch.no_grad():  # not inference_mode: FGSM below differentiates through x and y
        y = model(x).argmax(1)
    if det.probes:  # as training.fitting does: only kinds that read earlier layers get their statistics
        det.set_layer_statistics(gaussians_for(det, model).fit(model, x, y.cpu(), batch_size=64))
    spec = InputSpec(3, 32, 32, model.mean.flatten().tolist(), model.std.flatten().tolist())
    bundle = Bundle(model, det, [str(i) for i in range(10)], spec, "benchmark", {}, None, Path("."), "")
    clean_rows, clean = bundle.features(x)
    adv_rows, _ = bundle.features(fgsm(model, x, y, eps=8 / 255))
    rows = np.concatenate([clean_rows, adv_rows])
    labels = np.r_[np.zeros(len(clean_rows), int), np.ones(len(adv_rows), int)]
    det.fit(rows, labels, calibration=clean_rows)
    det.calibrate(clean.sharpness.cpu().numpy())
    return bundle


def describe_detector(detector: str | None = None) -> str:
    """What the detector of the kind ``detector`` (default: the default one) computes per batch, in words
    (for the overhead table's description)."""
    from detector.estimator import DEFAULT_DETECTOR, make_detector
    from detector.layers import GRAM_LAYERS_IN_WORDS, probes_in_words

    name = detector or DEFAULT_DETECTOR
    det = make_detector(name)
    which = "the default detector" if name == DEFAULT_DETECTOR else "the detector"
    estimator = det.estimator.steps[-1][1] if hasattr(det.estimator, "steps") else det.estimator
    classifier = type(estimator).__name__ if estimator is not None else "DecisionTreeClassifier"
    if not det.probes:
        return (f"{which} (`{name}`) through `Bundle.detect`, what the service calls per batch: one forward pass, "
                f"`{det.feature_set}` features, {classifier}")
    means = " and channel means" + (" after max(0, ·)" if det.probe_rectified else "")
    stats = ("class-conditional Mahalanobis distances" + (" and agreement gaps" if det.probe_agreement else "")
             + (means if det.probe_means else ""))
    grams = f" and {GRAM_LAYERS_IN_WORDS}" if det.probe_gram else ""
    return (f"{which} (`{name}`) through `Bundle.detect`, what the service calls per "
            f"batch: the same single forward pass with hooks on {probes_in_words(det.probes)}, curvature features, "
            f"{stats} of those layers and of φ{grams}, {classifier}")
