"""Service configuration: environment variables with the ``DETECTOR_`` prefix, overridable by flags.

Every field reads ``DETECTOR_<FIELD NAME IN CAPITALS>``; ``detector-serve`` flags take precedence
(they are passed as init arguments, which pydantic-settings ranks above the environment).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from detector.images import DEFAULT_MAX_PIXELS

__all__ = ["ENV_PREFIX", "MiB", "Settings"]

ENV_PREFIX = "DETECTOR_"
MiB = 1 << 20
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    bundle: Path | None = Field(
        None, description="Bundle directory. Empty or unset: the embedded default (default_bundle_dir)."
    )
    bundle_sha256: str | None = Field(
        None, description="Pin: the only bundle hash (manifest.json's SHA-256, /model's sha256, "
                          "`detector-bundle verify`) start-up accepts. Empty or unset: any verified bundle.")
    trusted_architectures: str = Field(
        "", description="Comma-separated bring-your-own architectures ('package.module:callable') a bundle may "
                        "name: loading imports and calls them. Empty: built-in architectures only.")
    default_bundle_dir: Path = Field(
        Path("artifacts/default"),
        description="Where the embedded default bundle (digits) lives; detector-serve trains it there if missing.",
    )
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps.")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Largest micro-batch; 1 turns batching off.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="Longest a request waits for others to fill its micro-batch."
    )
    max_queue: int = Field(
        4096, ge=1, description="Images waiting for the model beyond which requests get 503 (overload)."
    )
    max_upload_bytes: int = Field(10 * MiB, ge=1, description="Byte cap of a /predict request body.")
    max_batch_upload_bytes: int | None = Field(
        None, ge=1, description="Byte cap of a /predict/batch request body; unset: 4 × max_upload_bytes."
    )
    max_inflight_body_bytes: int = Field(
        256 * MiB, ge=1, description="Body bytes the requests being served may hold in all, per worker, counted "
                                     "as they arrive; a request whose body would pass it gets 503 with Retry-After. "
                                     "At least max_batch_upload_bytes.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Largest width × height accepted, checked from the header before "
                                              "decoding; it bounds each image's decode time (formats without reduced "
                                              "decoding, such as PNG and WebP, are decoded whole).")
    max_batch_files: int = Field(64, ge=1, description="Most files in one /predict/batch request.")
    decode_threads: int = Field(
        max(2, min(4, os.cpu_count() or 1)), ge=1, description="Images decoded at once (bounds decoder memory)."
    )
    torch_threads: int = Field(
        0, ge=0, description="PyTorch intra-op threads for CPU inference; 0 keeps PyTorch's default (one per core).")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Byte cap of a request's head (request line and headers); 431 beyond.")
    max_headers: int = Field(100, ge=8, description="Most headers in one request; 431 beyond.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a request head may take to arrive, from the connection's start (or the "
                                "next request's first byte); 408 and close beyond. Also ends connections that "
                                "send nothing.")
    body_timeout_s: float = Field(
        60.0, gt=0, description="Seconds a request body may take to arrive after its head; 408 and close beyond.")
    max_connections: int = Field(
        0, ge=0, description="Open connections per worker beyond which new ones get 503 and are closed; 0: "
                             "min(1000, the open-file limit − 128).")
    max_connections_per_client: int = Field(
        128, ge=0, description="Open connections per client address per worker; 0: no cap (behind a proxy, "
                               "every client has the proxy's address).")
    api_keys: str = Field(
        "", description="Comma-separated API keys (at least 16 characters each); with any key configured, "
                        "/predict, /predict/batch, /model and /metrics need one (Authorization: Bearer KEY or "
                        "X-API-Key: KEY). Prefer api_keys_file.")
    api_keys_file: Path | None = Field(
        None, description="A file with one API key per line ('#' comments), e.g. a Docker or Kubernetes secret.")
    rate_limit_per_s: float = Field(
        0.0, ge=0, description="Images a second each client (API key, or address without keys) may send, per "
                               "worker; 429 beyond. 0: no limit.")
    rate_limit_burst: int = Field(
        0, ge=0, description="Images a client may send at once under the rate limit; 0: max(max_batch_files, "
                             "the rate).")
    verdict_only: bool = Field(
        False, description="Answer only the verdict (label, class name, adversarial, uncanny_valley): no "
                           "probabilities, ψ, κ or scores, which an adaptive attacker would use as an oracle.")
    audit_log: Path | None = Field(
        None, description="Also append the audit line of every flagged image (JSON) to this file.")
    quarantine_dir: Path | None = Field(
        None, description="Keep every flagged upload here, as <sha256>.<format>.")
    quarantine_max_bytes: int = Field(
        1024 * MiB, ge=0, description="Bytes the quarantine may hold; once full, new flagged images are not kept.")
    unready_after_failures: int = Field(
        3, ge=1, description="Micro-batches in a row in which the model failed on every image, after which "
                             "readiness answers 503 until a probe inference passes again.")
    warmup_iterations: int = Field(
        1, ge=1, description="Warm-up inferences (at batch size 1 and max_batch_size) before readiness."
    )
    forwarded_allow_ips: str = Field(
        "", description="Comma-separated addresses (or networks, or '*') of reverse proxies whose X-Forwarded-For "
                        "and X-Forwarded-Proto are believed: the client the proxy names is then the one rate limits "
                        "and audit lines see. Empty: no forwarding header is read; the client is the connection's "
                        "address.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes (each loads the model).")
    worker_healthcheck_timeout_s: int = Field(
        60, ge=1, description="With workers > 1: seconds a worker may take to answer uvicorn's health check, at "
                              "start (importing PyTorch and the app) and later; one that does not is killed and "
                              "restarted.")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("bundle", "api_keys_file", "audit_log", "quarantine_dir", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("bundle_sha256", mode="before")
    @classmethod
    def _check_pin(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        value = str(value).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("bundle_sha256 must be 64 hex digits (the SHA-256 `detector-bundle verify` prints)")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fill_batch_upload_cap(self) -> Settings:
        if self.max_batch_upload_bytes is None:
            self.max_batch_upload_bytes = 4 * self.max_upload_bytes
        if self.max_inflight_body_bytes < self.largest_body_bytes:
            raise ValueError(f"max_inflight_body_bytes ({self.max_inflight_body_bytes:,}) is below the largest body "
                             f"a request may have ({self.largest_body_bytes:,}): such a request could never be served")
        return self

    @property
    def largest_body_bytes(self) -> int:
        return max(self.max_upload_bytes, self.max_batch_upload_bytes or 0)

    @property
    def max_inflight_body_bytes_per_client(self) -> int | None:
        """Body bytes in flight one client address may hold: a quarter of the cap, or one largest body
        (several clients' uploads always fit). ``None`` behind a proxy the service does not believe (no
        per-client connection cap, no trusted proxy), where every client is the proxy."""
        if self.max_connections_per_client == 0 and not self.forwarded_allow_ips:
            return None
        return max(self.max_inflight_body_bytes // 4, self.largest_body_bytes)

    @property
    def bundle_dir(self) -> Path:
        """The bundle to serve: ``bundle`` if given, else the embedded default's directory."""
        return self.bundle if self.bundle is not None else self.default_bundle_dir

    @property
    def effective_max_connections(self) -> int:
        """``max_connections``, or when 0 a cap that leaves file descriptors for the model and the logs."""
        if self.max_connections:
            return self.max_connections
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            return 1000
        if soft == resource.RLIM_INFINITY:
            return 1000
        return max(16, min(1000, soft - 128))

    @property
    def effective_rate_limit_burst(self) -> int:
        if self.rate_limit_burst:
            return self.rate_limit_burst
        return max(self.max_batch_files, math.ceil(self.rate_limit_per_s))

    @property
    def trusted_architecture_list(self) -> list[str]:
        return [name.strip() for name in self.trusted_architectures.split(",") if name.strip()]

    @property
    def uses_default_bundle(self) -> bool:
        return self.bundle is None

    def to_env(self) -> dict[str, str]:
        """These settings as ``DETECTOR_*`` variables (how detector-serve hands them to workers)."""
        env = {}
        for name, value in self.model_dump().items():
            env[f"{ENV_PREFIX}{name.upper()}"] = "" if value is None else str(value)
        return env
