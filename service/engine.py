"""The model side of the service: a verified bundle on a device, answering batches of images.

One call of :meth:`Engine.infer` is one forward pass (:func:`detector.analyze`) for the whole batch;
the prediction, ψ, κ and the detector's answer all come from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detector import Bundle, load_bundle

__all__ = ["Engine", "ImageResult"]

log = logging.getLogger("service.engine")


@dataclass(frozen=True)
class ImageResult:
    """The answer for one image (plain Python values, ready for JSON)."""

    label: int
    class_name: str
    confidence: float
    probabilities: list[float]
    adversarial: bool
    adversarial_score: float
    uncanny_valley: bool
    relative_sharpness: float
    psi: list[float]


class Engine:
    """A loaded bundle on ``device``; :meth:`infer` is called from one thread at a time."""

    def __init__(self, bundle: Bundle, device: torch.device):
        self.bundle = bundle
        self.device = device
        self.model = bundle.model.to(device).eval()
        spec = bundle.input_spec
        self.channels = spec.channels
        self.size = (spec.height, spec.width)
        self.valley_threshold = float(bundle.detector.valley_threshold_)

    @classmethod
    def load(cls, path: str | Path, device: torch.device, expected_sha256: str | None = None,
             trusted_architectures: Sequence[str] = ()) -> Engine:
        """Verify every file of the bundle against its manifest (and the bundle against the pinned
        hash, when given), then load it onto ``device``."""
        bundle = load_bundle(path, map_location=device, expected_sha256=expected_sha256,
                             trusted_architectures=trusted_architectures)
        return cls(bundle, device)

    @property
    def name(self) -> str:
        """A human name: architecture and, when the report says, the dataset (``cnn/digits``)."""
        report = self.bundle.report or {}
        data = report.get("data")
        dataset = None
        if isinstance(data, str):
            dataset = data
        elif isinstance(data, dict):
            dataset = next((data[k] for k in ("spec", "name") if isinstance(data.get(k), str)), None)
        return f"{self.bundle.architecture}/{dataset}" if dataset else self.bundle.architecture

    @property
    def sha256(self) -> str:
        return self.bundle.sha256

    def infer(self, images: list[np.ndarray]) -> list[ImageResult]:
        """Answers for uint8 ``H×W×C`` images already in the input spec's shape, in order."""
        if not images:
            return []
        batch = torch.from_numpy(np.stack(images))  # [N, H, W, C] uint8
        # Move the uint8 pixels (4× smaller than float), convert on the device.
        x = batch.to(self.device).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        answer = self.bundle.detect(x)
        classes = self.bundle.classes
        results = []
        for i, label in enumerate(answer.labels.tolist()):
            results.append(ImageResult(
                label=int(label),
                class_name=classes[label],
                confidence=float(answer.probabilities[i, label]),
                probabilities=answer.probabilities[i].astype(np.float64).tolist(),
                adversarial=bool(answer.adversarial[i]),
                adversarial_score=float(answer.adversarial_score[i]),
                uncanny_valley=bool(answer.uncanny_valley[i]),
                relative_sharpness=float(answer.sharpness[i]),
                psi=answer.psi[i].tolist(),
            ))
        return results

    def warm_up(self, batch_sizes: tuple[int, ...], iterations: int = 1) -> None:
        """Run the model on blank batches and check that the answers are sane."""
        h, w = self.size
        for _ in range(iterations):
            for n in batch_sizes:
                images = [np.full((h, w, self.channels), 127, dtype=np.uint8)] * n
                results = self.infer(images)
                if len(results) != n:
                    raise RuntimeError(f"warm-up at batch size {n} returned {len(results)} answers")
                first = results[0]
                if len(first.probabilities) != len(self.bundle.classes) or not np.all(
                    np.isfinite(first.probabilities + first.psi + [first.relative_sharpness])
                ):
                    raise RuntimeError(f"warm-up at batch size {n} gave non-finite or misshapen outputs")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
