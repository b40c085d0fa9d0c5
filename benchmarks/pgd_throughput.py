"""Item 3: PGD-10 throughput with the path recorded vs the adversarial-robustness-toolbox's PGD.

Same model, same inputs, same settings (L∞, no random start, 10 steps; ε = 8/255, α = 2/255 on
CIFAR-shaped inputs, ε = 0.3, α = 0.075 on digits), interleaved in one process:

- ``detector.pgd(record=True)``: the attack plus ψ, κ, loss and prediction at every iterate x_0 … x_T;
- ``detector.pgd(record=False)``: the bare attack;
- ART ``ProjectedGradientDescentPyTorch.generate`` (``num_random_init=0``, one batch), called as its
  users call it: numpy in, numpy out; it also evaluates the model on x and x_adv at the end to log its
  success rate (2 extra forwards).  Ours with ``record=True`` adds 1 forward (at x_T).

The adversarial batches are checked to agree (max |Δ|; bit-identical for L∞ in the test suite).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from detector import pgd

from .common import (
    CPU,
    Section,
    Stats,
    Table,
    Target,
    cifar_batch,
    cifar_model,
    digits_model,
    fmt_rate,
    fmt_ratio_stats,
    fmt_time_stats,
    interleaved,
    load_average,
    synchronizer,
)

CIFAR_ATTACK = {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10}
DIGITS_ATTACK = {"eps": 0.3, "alpha": 0.075, "steps": 10}


def art_attack(model, x: torch.Tensor, num_classes: int, attack: dict[str, Any], device: torch.device,
               steps: int | None = None):
    """ART's PyTorch PGD on ``model`` with our settings."""
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                   nb_classes=num_classes, clip_values=(0.0, 1.0),
                                   device_type="gpu" if device.type == "cuda" else "cpu")
    return ProjectedGradientDescentPyTorch(classifier, norm=np.inf, eps=attack["eps"], eps_step=attack["alpha"],
                                           max_iter=steps if steps is not None else attack["steps"],
                                           num_random_init=0, batch_size=len(x), verbose=False)


def _cases(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    if quick:
        return [{"name": "cnn, digits (trained)", "model": "digits", "batch": 32, "repeats": 2}]
    if device.type == "cuda":
        return [
            {"name": "cnn, digits (trained)", "model": "digits", "batch": 360, "repeats": 10},
            {"name": "cnn, 3×32×32 (random init)", "model": "cnn", "batch": 1024, "repeats": 10},
            {"name": "wrn (WRN-28-4), 3×32×32 (random init)", "model": "wrn", "batch": 256, "repeats": 6},
            {"name": "wrn (WRN-28-4), 3×32×32 (random init)", "model": "wrn", "batch": 1024, "repeats": 4},
        ]
    return [
        {"name": "cnn, digits (trained)", "model": "digits", "batch": 360, "repeats": 6},
        {"name": "cnn, 3×32×32 (random init)", "model": "cnn", "batch": 128, "repeats": 4},
        {"name": "wrn (WRN-28-4), 3×32×32 (random init)", "model": "wrn", "batch": 16, "repeats": 3},
    ]


def run(device: torch.device = CPU, quick: bool = False,
        cases: list[dict[str, Any]] | None = None, log=print) -> Section:
    started = time.perf_counter()
    load_before = load_average()
    sync = synchronizer(device)
    section = Section(
        key="pgd",
        title="3. PGD-10 throughput: path recording vs ART",
        description=(
            "Images per second for PGD-10 (L∞, no random start) on the same model and inputs, interleaved in one "
            "process: `detector.pgd(record=True)` (ψ, κ, loss, prediction at all 11 iterates), "
            "`detector.pgd(record=False)`, and the adversarial-robustness-toolbox's "
            "`ProjectedGradientDescentPyTorch.generate` (numpy in/out as its users call it; it also runs the model "
            "on x and x_adv to log its success rate). Throughput = batch / median time; ratios per round. "
            "Warm-up: one 1-step attack of each."
        ),
        command="",
        load_before=load_before,
    )
    table = Table("PGD-10: time per batch, median (IQR); images/s from the median",
                  ["model", "batch", "repeats", "ours, record=True", "ours, record=False", "ART",
                   "img/s record=True", "img/s record=False", "img/s ART",
                   "ART time / ours record=True", "record=True / record=False", "max |x_adv ours − ART|"])
    raw: list[dict[str, Any]] = []
    worst = float("inf")
    for case in (cases or _cases(quick, device)):
        if "module" in case:  # a caller's own model and batch (the smoke test's tiny CNN)
            model, x, y = case["module"].to(device).eval(), case["x"].to(device), case["y"].to(device)
            attack = case.get("attack", CIFAR_ATTACK)
        elif case["model"] == "digits":
            model, test = digits_model(quick)
            model = model.to(device)
            x, y = test.batch(slice(0, case["batch"]))
            x, y = x.to(device), y.to(device)
            attack = DIGITS_ATTACK
        else:
            model = cifar_model(case["model"], device)
            x, y = cifar_batch(case["batch"], device)
            attack = CIFAR_ATTACK
        num_classes = 10
        x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
        art = art_attack(model, x, num_classes, attack, device)
        log(f"  pgd: {case['name']} batch {case['batch']}: {case['repeats']} repeats …")
        # Warm-up: a 1-step attack of each (first-call costs of the backends, ART's setup).
        pgd(model, x, y, eps=attack["eps"], alpha=attack["alpha"], steps=1, record=True)
        pgd(model, x, y, eps=attack["eps"], alpha=attack["alpha"], steps=1)
        art_attack(model, x, num_classes, attack, device, steps=1).generate(x_np, y=y_np)
        sync()
        fns = {
            "record": lambda: pgd(model, x, y, record=True, **attack),
            "plain": lambda: pgd(model, x, y, **attack),
            "art": lambda: art.generate(x_np, y=y_np),
        }
        samples, _ = interleaved(fns, repeats=case["repeats"], min_sample_s=0.0, warmup=0, sync=sync)
        st = {k: Stats.of(v) for k, v in samples.items()}
        art_vs_ours = Stats.of([a / b for a, b in zip(samples["art"], samples["record"])])
        record_cost = Stats.of([a / b for a, b in zip(samples["record"], samples["plain"])])
        ours = pgd(model, x, y, record=True, **attack).x_adv.cpu()
        theirs = torch.from_numpy(art.generate(x_np, y=y_np))
        max_diff = float((ours - theirs).abs().max())
        n = case["batch"]
        table.add(case["name"], n, case["repeats"], fmt_time_stats(st["record"]), fmt_time_stats(st["plain"]),
                  fmt_time_stats(st["art"]), fmt_rate(n / st["record"].median), fmt_rate(n / st["plain"].median),
                  fmt_rate(n / st["art"].median), fmt_ratio_stats(art_vs_ours, 2), fmt_ratio_stats(record_cost, 3),
                  f"{max_diff:.1e}")
        worst = min(worst, art_vs_ours.median)
        raw.append({"case": case["name"], "batch": n, "times": {k: v.to_dict() for k, v in st.items()},
                    "art/record": art_vs_ours.to_dict(), "record/plain": record_cost.to_dict(),
                    "images_per_s": {k: n / v.median for k, v in st.items()}, "max_abs_diff": max_diff})
    section.tables = [table]
    if raw:
        rec = [r["record/plain"]["median"] for r in raw]
        art = [r["art/record"]["median"] for r in raw]
        section.notes += [
            f"Recording the path costs {min(rec) - 1:+.1%} … {max(rec) - 1:+.1%} over the bare attack: one extra "
            "forward at x_T (1/(3T) of the attack's forward+backward work for T = 10) plus ψ, κ, loss and argmax "
            "on tensors of N×k per step.",
            f"ART takes {min(art):.2f}× … {max(art):.2f}× the time of our recording attack. Per step both do one "
            "forward and one backward; ART also copies numpy ↔ torch, runs its DataLoader, one-hot encodes the "
            "labels and evaluates the model twice more at the end (x and x_adv) to log its success rate.",
            "The adversarial batches agree (last column; L∞ without random start is bit-identical, as "
            "tests/test_attacks.py also checks), so both attacks do the same work.",
        ]
    section.targets = [Target("PGD-10 throughput with the path recorded vs ART", "≥ ART (ratio ART time / ours ≥ 1)",
                              f"worst median ratio {worst:.2f}", worst >= 1.0)]
    section.raw = {"cases": raw}
    section.seconds = time.perf_counter() - started
    section.load_after = load_average()
    return section
