"""``detector-trajectory``: κ and the loss along the PGD path for a model and data, no detector.

The researcher's tool for seeing the uncanny valley on their own model: it writes the Figure-1 plot,
``trajectory.csv`` (one row per step), ``trajectory_per_example.csv`` (one row per attacked input)
and ``trajectory.json``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np

from detector import distributed

from .attacking import attack_paths, path_statistics, sample_correct, trajectory_summary
from .options import PipelineError, TrainOptions, attack_settings, resolve_device
from .output import check_results_dir, dump_json, json_safe, machine_info
from .prepare import prepare
from .report import FIGURE1, figure_title, plot_trajectory, write_trajectory_csv

__all__ = ["run_trajectory"]


def _per_example_csv(path: Path, attacked, classes: list[str]) -> None:
    steps = attacked.sharpness.shape[1]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["test_index", "label", "class", "success", "linf", "l2"]
                        + [f"kappa_{t}" for t in range(steps)] + [f"loss_{t}" for t in range(steps)]
                        + [f"pred_{t}" for t in range(steps)])
        for i in range(len(attacked.index)):
            writer.writerow(
                [int(attacked.index[i]), int(attacked.labels[i]), classes[int(attacked.labels[i])],
                 int(attacked.success[i]), f"{attacked.linf[i]:.6g}", f"{attacked.l2[i]:.6g}"]
                + [f"{v:.6g}" for v in attacked.sharpness[i]] + [f"{v:.6g}" for v in attacked.loss[i]]
                + [int(v) for v in attacked.predictions[i]])


def run_trajectory(options: TrainOptions) -> dict[str, Any]:
    """Train or load the classifier, attack up to ``max_samples`` correctly classified test images
    with the path recorded, and write the plot and CSVs to ``options.out``; returns the summary."""
    total_start = time.perf_counter()
    if options.max_samples < 1:
        raise PipelineError(f"--max-samples must be at least 1, got {options.max_samples}")
    check_results_dir(Path(options.out))
    attack = attack_settings(options)
    distributed.init(resolve_device(options.device))  # under torchrun: join the other ranks
    prepared = prepare(options)
    timing = prepared.timing
    start = time.perf_counter()
    index = distributed.broadcast(sample_correct(prepared.test_correct, options.max_samples, options.seed))
    if len(index) == 0:
        raise PipelineError("the classifier gets no test image right; there is no path to follow")
    attacked = attack_paths(prepared.model, prepared.test, index, attack, layer=prepared.layer,
                            device=prepared.device, batch_size=options.batch_size, seed=options.seed,
                            progress=options.progress)
    timing["attack"] = time.perf_counter() - start
    stats = path_statistics(attacked)
    successful = path_statistics(attacked, np.flatnonzero(attacked.success))
    summary: dict[str, Any] = {
        "command": options.command,
        **prepared.info,
        "attack": {**attack.to_dict(), "n_attacked": int(len(index)),
                   "success_rate": float(attacked.success.mean()), "max_linf": float(attacked.linf.max())},
        "trajectory": {**stats, **trajectory_summary(stats),
                       "mean_sharpness_successful": successful["mean_sharpness"],
                       "mean_loss_successful": successful["mean_loss"]},
        "machine": machine_info(prepared.device),
    }
    if not distributed.is_main():  # rank 0 writes
        return json_safe(summary)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_trajectory(out / FIGURE1, stats, title=figure_title(json_safe(summary)))
    write_trajectory_csv(out / "trajectory.csv", stats,
                         {"mean_sharpness_successful": successful["mean_sharpness"] or None})
    _per_example_csv(out / "trajectory_per_example.csv", attacked, prepared.test.classes)
    timing["total"] = time.perf_counter() - total_start
    summary["timing"] = {"seconds": {k: round(v, 3) for k, v in timing.items()}}
    summary["files"] = [FIGURE1, "trajectory.csv", "trajectory_per_example.csv", "trajectory.json"]
    dump_json(out / "trajectory.json", summary)
    return json_safe(summary)
