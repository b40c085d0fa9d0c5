"""The attack stage: PGD along a recorded path on the images the classifier gets right, and the
per-step statistics of that path (the uncanny valley in numbers)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from detector import ImageDataset, analyze, distributed, pgd

from .classifier import predict
from .fitting import AttackedSet
from .options import AttackSettings

__all__ = ["attack_paths", "path_statistics", "sample_correct", "select_correct", "top_up_calibration", "trajectory_summary"]


def sample_correct(correct: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Up to ``max_samples`` indices where ``correct`` holds, drawn at random (seeded), sorted."""
    index = np.flatnonzero(correct)
    return np.sort(np.random.default_rng(seed).permutation(index)[:max_samples])


def top_up_calibration(correct: np.ndarray, taken: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` more correctly classified images outside ``taken`` (none for ``n`` ≤ 0), sorted: clean
    calibration images that cost no attack.

    The first ``n`` such images in one seeded order of the whole split, so that a few more or fewer images
    in ``taken`` change the draw by those few, not all of it."""
    free = np.array(correct, dtype=bool)
    free[np.asarray(taken, dtype=np.int64)] = False
    order = np.random.default_rng(seed + 5).permutation(len(free))
    return np.sort(order[free[order]][:max(n, 0)])


def select_correct(model: torch.nn.Module, test: ImageDataset, max_samples: int, seed: int,
                   device: torch.device, batch_size: int = 512) -> np.ndarray:
    """The test images :func:`run` attacks: up to ``max_samples`` the classifier gets right."""
    correct = (predict(model, test, batch_size, device) == test.labels).numpy()
    return sample_correct(correct, max_samples, seed)


def attack_paths(model: torch.nn.Module, data: ImageDataset, index: np.ndarray, attack: AttackSettings,
                 *, layer: str | None, device: torch.device, batch_size: int, seed: int,
                 progress: bool = True) -> AttackedSet:
    """PGD with ``record=True`` on ``data[index]`` in batches; everything comes back on the CPU.
    Under torchrun each rank attacks its share and every rank gets the whole set."""
    model.to(device).eval()

    def attack_batch(positions: np.ndarray, b: int) -> dict[str, np.ndarray]:
        x, y = data.batch(torch.as_tensor(index[positions]))
        x, y = x.to(device), y.to(device)
        clean = analyze(model, x, layer)
        result = pgd(model, x, y, eps=attack.eps, alpha=attack.alpha, steps=attack.steps,
                     norm=attack.norm, random_start=attack.random_start, record=True,
                     layer=layer, seed=seed + b)
        delta = (result.x_adv - x).flatten(1)
        return {
            "clean_psi": clean.psi.cpu().numpy(),
            "clean_kappa": clean.sharpness.cpu().numpy(),
            "psi": result.psi.float().cpu().numpy(),
            "sharpness": result.sharpness.float().cpu().numpy(),
            "loss": result.loss.float().cpu().numpy(),
            "predictions": result.predictions.cpu().numpy(),
            "success": result.success.cpu().numpy(),
            "linf": delta.abs().amax(dim=1).cpu().numpy(),
            "l2": torch.linalg.vector_norm(delta, dim=1).cpu().numpy(),
            "logits": result.logits.float().cpu().numpy(),
            "phi_sq": result.phi_sq.float().cpu().numpy(),
        }

    arrays = distributed.map_batches(len(index), batch_size, attack_batch, desc="PGD attack", progress=progress)
    return AttackedSet(index=np.asarray(index), labels=data.labels[torch.as_tensor(index)].numpy(), **arrays)


def path_statistics(attacked: AttackedSet, rows: np.ndarray | None = None) -> dict[str, list[float]]:
    """Per-step mean and spread of κ and of the loss, and the share misclassified, over ``rows``."""
    rows = np.arange(len(attacked.index)) if rows is None else rows
    kappa, loss = attacked.sharpness[rows], attacked.loss[rows]
    flipped = attacked.predictions[rows] != attacked.labels[rows, None]
    out: dict[str, list[float]] = {"step": list(range(kappa.shape[1]))}
    for name, values in (("sharpness", kappa), ("loss", loss)):
        q = np.quantile(values, [0.1, 0.25, 0.5, 0.75, 0.9], axis=0) if len(rows) else np.zeros((5, kappa.shape[1]))
        out[f"mean_{name}"] = values.mean(axis=0).tolist() if len(rows) else []
        out[f"std_{name}"] = values.std(axis=0).tolist() if len(rows) else []
        for label, row in zip(("q10", "q25", "median", "q75", "q90"), q, strict=True):
            out[f"{label}_{name}"] = row.tolist()
    out["misclassified_fraction"] = flipped.mean(axis=0).tolist() if len(rows) else []
    return out


def trajectory_summary(stats: dict[str, list[float]]) -> dict[str, Any]:
    """Where mean κ peaks and how far it rises and falls: the uncanny valley in three numbers."""
    mean = np.asarray(stats["mean_sharpness"])
    peak = int(mean.argmax())
    return {
        "peak_step": peak,
        "rise": float(mean[peak] / mean[0]) if mean[0] > 0 else float("inf"),
        "fall": float(mean[-1] / mean[peak]) if mean[peak] > 0 else 0.0,
        "final_over_clean": float(mean[-1] / mean[0]) if mean[0] > 0 else float("inf"),
    }
