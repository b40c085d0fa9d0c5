"""Request and response models (they are what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchUpload",
    "ErrorResponse",
    "InputSpecModel",
    "Liveness",
    "ModelMetadata",
    "ModelRef",
    "Prediction",
    "UploadInfoModel",
    "Readiness",
    "Verdict",
    "ServiceLimits",
    "SingleUpload",
]


# -- requests ----------------------------------------------------------------------------------
class SingleUpload(BaseModel):
    """``multipart/form-data`` with one image."""

    file: UploadFile = Field(
        description="The image: PNG, JPEG, BMP, WebP or GIF (first frame), any mode. Its declared "
                    "content type, when it names an image type, must match the data.")


class BatchUpload(BaseModel):
    """``multipart/form-data`` with several images, each under the field name ``files``."""

    files: list[UploadFile] = Field(
        min_length=1, description="The images, answered in this order (at least one, at most "
                                  "DETECTOR_MAX_BATCH_FILES); PNG, JPEG, BMP, WebP or GIF each.")


# -- responses ---------------------------------------------------------------------------------
class ModelRef(BaseModel):
    name: str = Field(description="Architecture and dataset of the bundle, e.g. 'cnn/digits'.")
    sha256: str = Field(description="SHA-256 of the bundle's manifest: identifies every file of it.")


class UploadInfoModel(BaseModel):
    """What the upload was before it became the model's input."""

    format: str = Field(description="The image format the data was sniffed as (PNG, JPEG, …).")
    width: int = Field(description="Width of the upload, in pixels.")
    height: int = Field(description="Height of the upload, in pixels.")
    mode: str = Field(description="PIL mode of the upload (L, RGB, RGBA, P, I;16, …).")
    resized: bool = Field(description="The image was resized (bilinear) to the model's input size. The "
                                      "detector's false-positive rate was measured on images at the model's "
                                      "size and on its own resize path; other rescalings can raise it.")
    converted: bool = Field(description="The image was converted to the model's channels (grey/RGB, alpha and "
                                        "palette dropped, 16-bit scaled).")
    note: str = Field(description="The same in words, e.g. 'resized from 256×256 to 32×32'; empty when "
                                  "the image was used as it came.")


class Prediction(BaseModel):
    """The classifier's answer and the detector's verdict for one image (one forward pass)."""

    label: int = Field(description="Predicted class index.")
    class_name: str = Field(description="Name of the predicted class.")
    confidence: float = Field(description="Softmax probability of the predicted class, in [0, 1].")
    probabilities: list[float] = Field(description="Softmax over all classes, in class order.")
    adversarial: bool = Field(description="The detector flags the image as adversarial (score ≥ its threshold).")
    adversarial_score: float = Field(
        description="P(adversarial) given the detector's features (ψ, κ and, for the default, earlier layers), "
                    "in [0, 1].")
    uncanny_valley: bool = Field(
        description="Flagged adversarial AND at least as flat as typical clean data (κ ≤ τ): "
                    "confidently wrong in a flat region.")
    relative_sharpness: float = Field(description="κ = ‖W‖_F · Σ_j ψ_j, the relative sharpness at this input.")
    valley_threshold: float = Field(description="τ, the uncanny-valley threshold on κ (a quantile of clean κ).")
    psi: list[float] = Field(description="ψ_j = ŷ_j(1 − ŷ_j)‖φ‖², per class (the paper's features).")
    input: UploadInfoModel | None = Field(None, description="What the upload was, and whether it was resized "
                                                            "or converted on the way to the model.")
    model: ModelRef


class ErrorResponse(BaseModel):
    """Every error answer (4xx, and 5xx should one ever happen)."""

    code: str = Field(description="A stable keyword, e.g. 'corrupt_image', 'request_too_large'.")
    detail: str = Field(description="What was wrong, for a human.")
    errors: list[dict[str, Any]] | None = Field(None, description="Field-level details of a validation error.")


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed"]
    detail: str | None = Field(None, description="Why it is not ready.")
    model: ModelRef | None = None


class Verdict(BaseModel):
    """The answer when the service runs with DETECTOR_VERDICT_ONLY: the label and the detector's flags,
    without the probabilities, ψ, κ and scores an adaptive attacker would steer by."""

    label: int = Field(description="Predicted class index.")
    class_name: str = Field(description="Name of the predicted class.")
    adversarial: bool = Field(description="The detector flags the image as adversarial.")
    uncanny_valley: bool = Field(description="Flagged adversarial AND at least as flat as typical clean data.")
    input: UploadInfoModel | None = Field(None, description="What the upload was, and whether it was resized "
                                                            "or converted on the way to the model.")
    model: ModelRef


class InputSpecModel(BaseModel):
    channels: int = Field(description="1 (grey) or 3 (RGB); uploads are converted to this.")
    height: int = Field(description="Uploads are resized (bilinear) to height × width.")
    width: int
    mean: list[float] = Field(description="Per-channel normalisation inside the model (pixels in [0, 1]).")
    std: list[float]


class ServiceLimits(BaseModel):
    max_upload_bytes: int
    max_batch_upload_bytes: int
    max_pixels: int
    max_batch_files: int
    max_batch_size: int
    max_wait_ms: float
    formats: list[str]


class ModelMetadata(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    sha256: str
    architecture: str
    layer: str | None = Field(description="The output layer ψ and κ are taken at (None: the last Linear).")
    classes: list[str]
    input_spec: InputSpecModel
    thresholds: dict[str, float] = Field(
        description="'adversarial': score threshold; 'valley': τ; 'valley_quantile': the clean-κ quantile τ is.")
    detection_metrics: dict[str, Any] | None = Field(
        description="Detection metrics from the bundle's training report (None when it has no report).")
    coverage: dict[str, Any] | None = Field(
        None, description="What the detector catches: the attack-suite evaluation on held-out images from the "
                          "bundle's report: detector-train's, or the one detector-evaluate --attach added (per attack: "
                          "success, detection and evasion rates with 95% intervals, AUROC, evasion budget; per "
                          "natural shift: flagged rate; clean false positives). None when the bundle holds no "
                          "evaluation.")
    device: str = Field(description="Where the classifier runs.")
    limits: ServiceLimits
