"""Item 1: detection overhead on top of classification, with two peer detectors as reference points.

Same model, same batch, same device, interleaved in one process:

- ``forward``: the bare classifier, ``model(x)`` with the logits brought to the host;
- ``detect`` (the paper's detector, ``--detector paper``): :func:`detector.analyze` (one forward pass,
  ψ and κ from the same pass) + the fitted tree and κ threshold (``UncannyValleyDetector.detect``) on
  the host;
- ``detect (default)`` (the default detector, with earlier layers): ``Bundle.detect``, what the service
  calls per batch: the same one forward pass with hooks on up to three convolutions, the curvature
  features, the earlier layers' statistics and the detector's classifier (see
  :func:`benchmarks.common.reference_bundle`; ``--detector`` times another kind there);
- ``squeeze`` (reference, timing only): a feature-squeezing-style detector (Xu et al. 2018): the
  model on x and on 3 squeezed copies (5-bit depth, 2×2 median, 3×3 median standing in for the
  costlier non-local means), score = max L1 distance of the softmax outputs: 4 forwards;
- ``mahalanobis`` (reference, timing only): a Mahalanobis-style detector (Lee et al. 2018) at ONE
  layer (the penultimate): forward, class-conditional Gaussian score, backward to the input,
  perturbed input, forward again, score.  The published method repeats this for every feature layer
  it uses (and adds a logistic regression), so this row is a lower bound on its cost.

Models are randomly initialised (timing does not depend on the weights); inputs are random pixels
of CIFAR's shape.  The tree is fitted on real ψ (see :func:`benchmarks.common.reference_detector`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_array

from detector import (
    analyze,
    find_last_linear,
    forward_features,
    psi,
    sharpness_from_psi,
)
from detector.estimator import DEFAULT_DETECTOR

from .common import (
    CPU,
    Section,
    Stats,
    Table,
    Target,
    autocast,
    cifar_batch,
    cifar_model,
    count_operations,
    describe_detector,
    fmt_ratio_stats,
    fmt_seconds,
    fmt_time_stats,
    interleaved,
    load_average,
    ratios,
    reference_bundle,
    reference_detector,
    synchronizer,
    tree_description,
)

TARGET_RATIO = 1.05
TARGET_MIN_BATCH = 32


# ------------------------------------------------------------------------------------------------
# Reference points (timing only): written here, clearly not part of the product.
# ------------------------------------------------------------------------------------------------
def _bit_depth(x: torch.Tensor, bits: int = 5) -> torch.Tensor:
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def _median(x: torch.Tensor, k: int) -> torch.Tensor:
    """k×k median filter, same size, reflect padding (scipy's median_filter, as feature squeezing uses)."""
    lo, hi = (k - 1) // 2, k // 2
    padded = F.pad(x, (lo, hi, lo, hi), mode="reflect")
    windows = padded.unfold(2, k, 1).unfold(3, k, 1)
    return windows.reshape(*windows.shape[:4], k * k).median(dim=-1).values


class FeatureSqueezingStyle:
    """BASELINE (reference point): 4 forwards, max L1 distance between softmax outputs."""

    def __init__(self, model: torch.nn.Module, amp_ctx):
        self.model = model
        self.amp_ctx = amp_ctx

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.amp_ctx():
            ref = torch.softmax(self.model(x).float(), dim=1)
            scores = []
            for squeezed in (_bit_depth(x), _median(x, 2), _median(x, 3)):
                probs = torch.softmax(self.model(squeezed).float(), dim=1)
                scores.append((probs - ref).abs().sum(dim=1))
        return torch.stack(scores).amax(dim=0).cpu()


class MahalanobisStyle:
    """BASELINE (reference point): forward + backward + forward at the penultimate layer."""

    def __init__(self, model: torch.nn.Module, amp_ctx, num_classes: int, dim: int, device, noise: float = 0.0014):
        gen = torch.Generator().manual_seed(0)
        self.model = model
        self.amp_ctx = amp_ctx
        self.means = torch.randn(num_classes, dim, generator=gen).to(device)
        a = torch.randn(dim, dim, generator=gen) / dim**0.5
        self.precision = (a @ a.T + torch.eye(dim)).to(device)  # tied covariance, SPD
        self.noise = noise

    def _distances(self, phi: torch.Tensor) -> torch.Tensor:
        diff = phi.float()[:, None, :] - self.means  # [N, k, d]
        return ((diff @ self.precision) * diff).sum(dim=-1)  # [N, k]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), self.amp_ctx():
            x = x.detach().clone().requires_grad_(True)
            _, phi = forward_features(self.model, x)
            closest = self._distances(phi).min(dim=1).values
            (grad,) = torch.autograd.grad(closest.sum(), x)
        with torch.inference_mode(), self.amp_ctx():
            x2 = (x.detach() - self.noise * grad.sign()).clamp(0, 1)
            _, phi2 = forward_features(self.model, x2)
            score = -self._distances(phi2).min(dim=1).values
        return score.cpu()


# ------------------------------------------------------------------------------------------------
def _plan(arch: str, batch: int, quick: bool, device: torch.device) -> tuple[int, float, int]:
    """(repeats, min seconds per sample, warm-up calls) for one cell; WRN's big CPU batches get few repeats."""
    if quick:
        return 2, 0.01, 1
    if device.type == "cuda":
        return 20, 0.2, 2
    if arch == "cnn":
        return 10, 0.2, 1
    if batch >= 256:
        return 3, 0.0, 0  # ≈ 4 s per forward: kernels are warm from the smaller batches; median of 3 rounds
    if batch >= 32:
        return 6, 0.0, 1
    return 10, 0.2, 1


def run(
    device: torch.device = CPU,
    archs: tuple[str, ...] = ("cnn", "wrn"),
    batch_sizes: tuple[int, ...] = (1, 32, 256),
    amps: tuple[str, ...] = ("none",),
    quick: bool = False,
    peers: bool = True,
    detector_source: str = "digits",
    detector: str | None = None,
    plan=None,
    log=print,
) -> Section:
    started = time.perf_counter()
    load_before = load_average()
    sync = synchronizer(device)
    det = reference_detector(detector_source, 10, quick=quick)
    kind = detector or DEFAULT_DETECTOR
    label = "default" if kind == DEFAULT_DETECTOR else kind  # the columns of another kind say which
    section = Section(
        key="overhead",
        title="1. Detection overhead",
        description=(
            "Bare forward vs forward + detection on the same model, batch and device, interleaved in one "
            "process. `forward` = `model(x)` with the logits copied to the host; `detect` = the paper's detector "
            "(`--detector paper`): `detector.analyze` (one forward pass; ψ, κ from it) + `UncannyValleyDetector.detect` "
            "(tree + κ threshold, on the host); `detect (" + label + ")` = " + describe_detector(detector) + " "
            "(statistics and classifier fitted on random images and their FGSM adversarials: timing only). "
            "Reference points (timing only, written in the benchmark): a feature-squeezing-style detector "
            "(4 forwards: x, 5-bit depth, 2×2 median, 3×3 median standing in for non-local means) and a "
            "Mahalanobis-style detector at one layer (forward + backward to the input + forward; the published "
            "method repeats this per feature layer, so its real cost is higher). "
            "Models are randomly initialised (weights do not change the cost); inputs are random 3×32×32 pixels. "
            f"The tree: fitted on real ψ ({'digits CNN, clean vs PGD-10 ε=0.3' if detector_source == 'digits' else 'random ψ'}), "
            f"{tree_description(det)}."
        ),
        command="",
        load_before=load_before,
    )
    columns = ["model", "precision", "batch", "repeats × calls", "forward", "detect", "detect / forward",
               f"detect ({label})", f"{label} / forward", "forward again / forward"]
    if peers:
        columns += ["squeeze (4 fwd)", "squeeze / forward", "mahalanobis (1 layer)", "mahalanobis / forward"]
    table = Table("Time per batch: median (IQR) over repeats; ratios per round, median (IQR)", columns)
    parts = Table(
        "Where the detection overhead goes (per batch, median over repeats, interleaved)",
        ["model", "precision", "batch", "forward", "ψ + κ from logits, φ", "hook + layer lookup",
         "tree + threshold (`detect`)", "same, sklearn-validated path (before the fix)", "parts / forward"],
    )
    operations = Table(
        "Tensor operations per call (views left out; each is at least one kernel launch on an accelerator)",
        ["model", "precision", "batch", "forward", "detect", f"detect ({label})", f"{label} / forward"],
    )
    raw: list[dict[str, Any]] = []
    raw_operations: list[dict[str, Any]] = []
    worst: dict[str, float] = {}
    worst_default: dict[str, float] = {}
    for arch in archs:
        model = cifar_model(arch, device)
        dim = find_last_linear(model).in_features
        log(f"  overhead: {arch}: fitting the {kind} detector for timing …")
        default_bundle = reference_bundle(model, device, n=64 if quick else 256, detector=detector)
        for amp in amps:
            amp_ctx = lambda amp=amp: autocast(device, amp)
            precision = "fp32" if amp == "none" else f"{amp} autocast"
            squeeze = FeatureSqueezingStyle(model, amp_ctx)
            maha = MahalanobisStyle(model, amp_ctx, 10, dim, device)
            for batch in batch_sizes:
                repeats, min_sample, *rest = (plan or _plan)(arch, batch, quick, device)
                warmup = rest[0] if rest else 1
                x, _ = cifar_batch(batch, device)

                def forward(x=x):
                    with torch.inference_mode(), amp_ctx():
                        logits = model(x)
                    return logits.cpu()

                def detect(x=x):
                    with amp_ctx():
                        out = analyze(model, x)
                    return det.detect(out.psi.cpu().numpy(), out.sharpness.cpu().numpy()), out.logits.cpu()

                def detect_default(x=x):
                    with amp_ctx():
                        return default_bundle.detect(x)

                # The same forward timed twice: how far apart two identical calls read here, the noise
                # floor the detectors' ratios are read against.
                fns = {"forward": forward, "detect": detect, "default": detect_default,
                       "forward again": lambda forward=forward: forward()}
                if peers:
                    fns["squeeze"] = lambda x=x: squeeze(x)
                    fns["mahalanobis"] = lambda x=x: maha(x)
                if batch == batch_sizes[0]:  # the count does not depend on the batch (but for CPU blocks)
                    counts = {name: count_operations(fns[name]) for name in ("forward", "detect", "default")}
                    operations.add(arch, precision, batch, counts["forward"], counts["detect"], counts["default"],
                                   f"{counts['default'] / counts['forward']:.2f}×")
                    raw_operations.append({"arch": arch, "amp": amp, "batch": batch, **counts})
                log(f"  overhead: {arch} {amp} batch {batch}: {repeats} repeats …")
                samples, number = interleaved(fns, repeats=repeats, min_sample_s=min_sample, sync=sync, warmup=warmup)
                st = {name: Stats.of(v) for name, v in samples.items()}
                ratio = ratios(samples, "detect", "forward")
                ratio_default = ratios(samples, "default", "forward")
                ratio_again = ratios(samples, "forward again", "forward")
                row = [arch, precision, batch, f"{repeats} × {number}",
                       fmt_time_stats(st["forward"]), fmt_time_stats(st["detect"]), fmt_ratio_stats(ratio),
                       fmt_time_stats(st["default"]), fmt_ratio_stats(ratio_default), fmt_ratio_stats(ratio_again)]
                entry = {"arch": arch, "amp": amp, "batch": batch, "repeats": repeats, "number": number,
                         "times": {k: v.to_dict() for k, v in st.items()}, "detect/forward": ratio.to_dict(),
                         "default/forward": ratio_default.to_dict(), "forward again/forward": ratio_again.to_dict(),
                         "samples": {k: list(v) for k, v in samples.items()}}
                if peers:
                    r_sq = ratios(samples, "squeeze", "forward")
                    r_ma = ratios(samples, "mahalanobis", "forward")
                    row += [fmt_time_stats(st["squeeze"]), fmt_ratio_stats(r_sq, 2),
                            fmt_time_stats(st["mahalanobis"]), fmt_ratio_stats(r_ma, 2)]
                    entry["squeeze/forward"] = r_sq.to_dict()
                    entry["mahalanobis/forward"] = r_ma.to_dict()
                table.add(*row)
                raw.append(entry)
                if batch >= TARGET_MIN_BATCH:
                    key = f"{arch} ({'fp32' if amp == 'none' else amp})"
                    worst[key] = max(worst.get(key, 0.0), ratio.median)
                    worst_default[key] = max(worst_default.get(key, 0.0), ratio_default.median)

                # The overhead's parts, measured on their own.
                with torch.inference_mode(), amp_ctx():
                    logits, phi = forward_features(model, x)
                weight = find_last_linear(model).weight
                with torch.inference_mode():
                    values = psi(logits, phi)
                    kappa = sharpness_from_psi(values, weight)
                psi_np, kappa_np = values.cpu().numpy(), kappa.cpu().numpy()

                def math_only():
                    with torch.inference_mode():
                        v = psi(logits, phi)
                        return sharpness_from_psi(v, weight).cpu()

                def hook_only():
                    # What analyze adds around the forward: one output-layer lookup + hook (de)registration.
                    linear = find_last_linear(model)
                    handle = linear.register_forward_pre_hook(lambda m, i: None)
                    handle.remove()
                    return linear

                def tree_only():
                    return det.detect(psi_np, kappa_np)

                def tree_validated():
                    # What detect() cost before the fast path in detector/estimator.py: sklearn's
                    # check_array, then the tree's own validation inside predict_proba.
                    X = check_array(psi_np, dtype=np.float64)
                    score = det.estimator_.predict_proba(X)[:, 1]
                    flagged = score >= det.threshold
                    return flagged & (np.asarray(kappa_np, dtype=np.float64) <= det.valley_threshold_)

                part_fns = {"forward": forward, "math": math_only, "hook": hook_only, "tree": tree_only,
                            "tree_validated": tree_validated}
                # Each part gets its own call count (µs-scale parts need many calls per sample).
                part_samples, _ = interleaved(part_fns, repeats=max(2, min(repeats, 6)),
                                              min_sample_s=max(min_sample, 0.01 if quick else 0.05),
                                              sync=sync, warmup=warmup, same_number=False)
                pst = {k: Stats.of(v) for k, v in part_samples.items()}
                parts_share = (pst["math"].median + pst["hook"].median + pst["tree"].median) / pst["forward"].median
                parts.add(arch, precision, batch,
                          fmt_seconds(pst["forward"].median), fmt_seconds(pst["math"].median),
                          fmt_seconds(pst["hook"].median), fmt_seconds(pst["tree"].median),
                          fmt_seconds(pst["tree_validated"].median), f"{parts_share:+.2%}")
                entry["parts_share"] = parts_share
                entry["parts"] = {k: v.to_dict() for k, v in pst.items()}
    section.tables = [table, parts, operations]
    section.notes += _notes(raw, worst, peers)
    if raw_operations:
        section.notes.append(
            "Tensor operations per call: " + ", ".join(
                f"{r['arch']} ({'fp32' if r['amp'] == 'none' else r['amp']}) forward {r['forward']}, "
                f"paper {r['detect']}, {label} {r['default']}" for r in raw_operations)
            + ". On an accelerator at small batches each operation is a kernel launch of a few microseconds "
            "whatever its size, so the operations detection adds can cost more there than their share of this "
            "CPU's time; the device's own rows measure it.")
    big = [r for r in raw if r["batch"] >= TARGET_MIN_BATCH]
    which = "default" if kind == DEFAULT_DETECTOR else "selectable"
    if big:
        again = [r["forward again/forward"]["median"] for r in big]
        section.notes.insert(0, (
            f"The noise floor: the same forward pass timed twice reads {min(again):.3f}–{max(again):.3f}× itself at "
            f"batch ≥ {TARGET_MIN_BATCH} (column 'forward again / forward'). A detector ratio within that far of 1 "
            f"is not told apart from the bare forward pass by this run, whichever side of {TARGET_RATIO} it falls."))
    if big:
        section.notes.insert(0, (
            "The {which} ({name}) detector at batch ≥ {b}: {lo:.3f}–{hi:.3f}× the bare forward pass, against "
            "{plo:.3f}–{phi:.3f}× for the paper's ψ tree: the earlier layers' statistics and the detector's "
            "classifier are what the difference costs.").format(
                which=which, name=kind, b=TARGET_MIN_BATCH, lo=min(r["default/forward"]["median"] for r in big),
                hi=max(r["default/forward"]["median"] for r in big),
                plo=min(r["detect/forward"]["median"] for r in big), phi=max(r["detect/forward"]["median"] for r in big)))
    for key, value in worst_default.items():
        section.targets.append(Target(
            f"Detection overhead, {which} ({kind}) detector, {key}, batch ≥ {TARGET_MIN_BATCH}",
            f"Bundle.detect / forward ≤ {TARGET_RATIO}", f"worst median ratio {value:.3f}", value <= TARGET_RATIO))
    for key, value in worst.items():
        section.targets.append(Target(
            f"Detection overhead, paper (ψ tree) detector, {key}, batch ≥ {TARGET_MIN_BATCH}",
            f"detect / forward ≤ {TARGET_RATIO}", f"worst median ratio {value:.3f}", value <= TARGET_RATIO))
    section.raw = {"rows": raw, "operations": raw_operations, "tree": tree_description(det)}
    section.seconds = time.perf_counter() - started
    section.load_after = load_average()
    return section


def _notes(raw: list[dict[str, Any]], worst: dict[str, float], peers: bool) -> list[str]:
    """Findings written from this run's numbers."""
    notes = []
    big = [r for r in raw if r["batch"] >= TARGET_MIN_BATCH]
    if big:
        lo = min(r["parts_share"] for r in big)
        hi = max(r["parts_share"] for r in big)
        notes.append(
            f"At batch ≥ {TARGET_MIN_BATCH} the overhead's parts measured on their own (ψ + κ, layer lookup and hook, "
            f"tree) add {lo:+.2%} to {hi:+.2%} of the forward pass: detection is the classifier's own forward pass "
            "plus O(N·k) arithmetic and one tree lookup per input.")
    small = [r for r in raw if r["batch"] < TARGET_MIN_BATCH]
    if small:
        notes.append(
            "At batch 1 the per-batch constants (one output-layer lookup, hook registration, the softmax and ψ "
            "kernels' launch cost, the sklearn call) weigh more against a tiny forward pass: "
            + ", ".join(f"{r['arch']} {r['detect/forward']['median']:.3f}×" for r in small) + " (no target at batch 1).")
    for key, value in worst.items():
        if value > TARGET_RATIO:
            rows = [r for r in big if f"{r['arch']} (" in key + " ("]
            notes.append(
                f"Target missed for {key}: worst median ratio {value:.3f}. The parts above predict at most "
                f"{max((r['parts_share'] for r in rows), default=float('nan')):+.2%}; the rest is run-to-run noise "
                "of a shared machine (see the ratio's IQR and the load average).")
    if peers and big:
        sq = [r["squeeze/forward"]["median"] for r in big]
        ma = [r["mahalanobis/forward"]["median"] for r in big]
        notes.append(
            f"Reference points at batch ≥ {TARGET_MIN_BATCH}: the feature-squeezing-style detector costs "
            f"{min(sq):.2f}–{max(sq):.2f}× the classifier, the one-layer Mahalanobis-style detector "
            f"{min(ma):.2f}–{max(ma):.2f}× (the published one repeats it per layer), against "
            f"{min(r['detect/forward']['median'] for r in big):.3f}–{max(r['detect/forward']['median'] for r in big):.3f}× "
            "for this detector.")
    notes.append(
        "Profiled (cProfile, `UncannyValleyDetector.detect` on a fitted tree): ~95 % of its time was sklearn input "
        "validation (`check_array` in `_check_psi`, then again in the tree's `predict_proba`: narwhals/dataframe "
        "sniffing, finiteness checks), not the tree (a few µs). Fixed in `detector/estimator.py`: a finite 2-D "
        "float ndarray skips `check_array`, and the default `DecisionTreeClassifier` is called with "
        "`check_input=False` on the already-checked array cast to float32 (what its own check does), same answers. "
        "The column 'before the fix' times the old validated path on the same inputs. Also `detector.analyze` looked "
        "the output layer up twice per call and `detector.pgd` once per step (a walk over all submodules, ~50–150 µs "
        "on WRN-28-4); both now look it up once (`detector/features.py`, `detector/attacks/pgd.py`).")
    return notes
