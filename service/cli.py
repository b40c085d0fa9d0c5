"""``detector-serve``: run the service with uvicorn.

With no bundle given it serves the embedded default (cnn on digits) from
``DETECTOR_DEFAULT_BUNDLE_DIR`` (``artifacts/default``), training it there first if it is missing.
Flags override ``DETECTOR_*`` environment variables; the resolved settings reach the uvicorn
worker(s) through the environment.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from detector.devices import DeviceError, resolve_device

from .protocol import PROTOCOL
from .settings import ENV_PREFIX, Settings

__all__ = ["build_parser", "ensure_default_bundle", "main", "settings_from_args"]

log = logging.getLogger("service.cli")

_FLAGS = {
    # flag: (settings field, type, help)
    "--bundle": ("bundle", str, "bundle directory (default: the embedded default, trained if missing)"),
    "--bundle-sha256": ("bundle_sha256", str, "refuse to start unless the bundle's SHA-256 is this one "
                                             "(`detector-bundle verify BUNDLE` prints it)"),
    "--trusted-architectures": ("trusted_architectures", str,
                                "comma-separated bring-your-own architectures (package.module:callable) a bundle "
                                "may name; loading imports and calls them (default: built-in ones only)"),
    "--default-bundle-dir": ("default_bundle_dir", str, "where the embedded default bundle lives"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N | mps (default auto: cuda when available)"),
    "--max-batch-size": ("max_batch_size", int, "largest micro-batch (1 = no batching; default 32)"),
    "--max-wait-ms": ("max_wait_ms", float, "longest wait for a micro-batch to fill (default 5)"),
    "--max-queue": ("max_queue", int, "queued images beyond which requests get 503 (default 4096)"),
    "--max-upload-bytes": ("max_upload_bytes", int, "byte cap of a /predict body (default 10 MiB)"),
    "--max-batch-upload-bytes": ("max_batch_upload_bytes", int,
                                 "byte cap of a /predict/batch body (default 4 × max upload bytes)"),
    "--max-inflight-body-bytes": ("max_inflight_body_bytes", int,
                                  "body bytes the requests being served may hold in all (default 256 MiB; 503 "
                                  "beyond)"),
    "--max-pixels": ("max_pixels", int, "pixel cap (width × height) checked before decoding (default 4096 × 4096)"),
    "--max-batch-files": ("max_batch_files", int, "most files per /predict/batch (default 64)"),
    "--decode-threads": ("decode_threads", int, "images decoded at once"),
    "--torch-threads": ("torch_threads", int, "PyTorch CPU threads (default 0: PyTorch's choice, one per core)"),
    "--max-header-bytes": ("max_header_bytes", int, "byte cap of a request head (default 16 KiB; 431 beyond)"),
    "--max-headers": ("max_headers", int, "most headers per request (default 100; 431 beyond)"),
    "--header-timeout-s": ("header_timeout_s", float, "seconds a request head may take (default 10; 408 beyond)"),
    "--body-timeout-s": ("body_timeout_s", float, "seconds a request body may take after its head (default 60)"),
    "--max-connections": ("max_connections", int,
                          "open connections per worker (default 0: min(1000, open-file limit − 128))"),
    "--max-connections-per-client": ("max_connections_per_client", int,
                                     "open connections per client address per worker (default 128; 0: no cap)"),
    "--api-keys-file": ("api_keys_file", str, "file with one API key per line; with keys, requests need one"),
    "--rate-limit-per-s": ("rate_limit_per_s", float, "images a second per client and worker (default 0: no limit)"),
    "--rate-limit-burst": ("rate_limit_burst", int, "images a client may send at once (default: max batch files)"),
    "--verdict-only": ("verdict_only", bool, "answer label and flags only, no probabilities, ψ, κ or scores"),
    "--audit-log": ("audit_log", str, "append an audit line (JSON) per flagged image to this file"),
    "--quarantine-dir": ("quarantine_dir", str, "keep flagged uploads here as <sha256>.<format>"),
    "--quarantine-max-bytes": ("quarantine_max_bytes", int, "bytes the quarantine may hold (default 1 GiB)"),
    "--unready-after-failures": ("unready_after_failures", int,
                                 "failed micro-batches in a row that turn readiness to 503 (default 3)"),
    "--warmup-iterations": ("warmup_iterations", int, "warm-up inferences before readiness (default 1)"),
    "--forwarded-allow-ips": ("forwarded_allow_ips", str,
                              "comma-separated addresses of reverse proxies whose X-Forwarded-For names the client "
                              "(default none: the connection's address is the client)"),
    "--host": ("host", str, "interface to bind (default 127.0.0.1)"),
    "--port": ("port", int, "port (default 8000)"),
    "--workers": ("workers", int, "uvicorn worker processes, each with its own model (default 1)"),
    "--worker-healthcheck-timeout-s": ("worker_healthcheck_timeout_s", int,
                                       "seconds a worker may take to answer uvicorn's health check (default 60)"),
    "--log-level": ("log_level", str, "critical | error | warning | info | debug | trace"),
}

#: Seconds uvicorn lets requests in flight finish after SIGTERM (orchestrators' grace periods exceed it).
GRACEFUL_SHUTDOWN_S = 10


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detector-serve",
        description="Serve an uncanny-valley detector bundle over HTTP (FastAPI + uvicorn). "
                    f"Every flag but --no-train has an environment variable {ENV_PREFIX}<FLAG> (e.g. "
                    f"--max-wait-ms: {ENV_PREFIX}MAX_WAIT_MS); flags win.",
    )
    for flag, (field, kind, help_text) in _FLAGS.items():
        if flag == "--trusted-architectures":  # spelled as detector-evaluate and detector-scan spell it too
            parser.add_argument(flag, "--trust-architecture", dest=field, action="append", default=None,
                                metavar="MODULE:CALLABLE[,…]", help=help_text + "; may be repeated")
        elif kind is bool:  # a switch: given alone it means true
            parser.add_argument(flag, dest=field, nargs="?", const="true", default=None, metavar="true|false",
                                help=help_text)
        else:
            parser.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    parser.add_argument("--no-train", dest="train_default", action="store_false",
                        help="do not train the embedded default bundle when it is missing; fail instead")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment first, then the flags that were given."""
    overrides = {field: getattr(args, field) for field, _, _ in _FLAGS.values() if getattr(args, field) is not None}
    if isinstance(overrides.get("trusted_architectures"), list):
        overrides["trusted_architectures"] = ",".join(overrides["trusted_architectures"])
    return Settings(**overrides)


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound, or None: checked before the bundle is trained or loaded,
    so a taken port fails in a second with a hint, not after the model is in memory."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve --host {host!r}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def ensure_default_bundle(directory: Path) -> None:
    """Train the embedded default bundle into ``directory`` when it has no manifest.json yet."""
    if (directory / "manifest.json").is_file():
        return
    if directory.is_dir() and any(directory.iterdir()):
        raise SystemExit(
            f"detector-serve: error: {str(directory)!r} exists but holds no bundle (no manifest.json); "
            "remove it to have the embedded default trained there, or pass --bundle")
    from training.pipeline import TrainOptions, run

    print(f"detector-serve: no bundle at {str(directory)!r}: training the embedded default "
          "(cnn on digits, about 20 s on a CPU)…", file=sys.stderr, flush=True)
    report = run(TrainOptions(out=str(directory), command="detector-serve (embedded default)"))
    detection = report.get("detection", {})
    print(f"detector-serve: default bundle written to {str(directory)!r} "
          f"(detection accuracy {detection.get('accuracy', float('nan')):.3f})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"detector-serve: error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        resolve_device(settings.device)
    except DeviceError as exc:
        print(f"detector-serve: error: {exc}", file=sys.stderr)
        return 2

    from .access import read_api_keys

    try:
        read_api_keys(settings.api_keys, settings.api_keys_file)
    except ValueError as exc:
        print(f"detector-serve: error: {exc}", file=sys.stderr)
        return 2
    problem = port_in_use(settings.host, settings.port)
    if problem is not None:
        print(f"detector-serve: error: {problem}; pick another with --port (or {ENV_PREFIX}PORT)", file=sys.stderr)
        return 2

    if settings.uses_default_bundle and args.train_default:
        ensure_default_bundle(Path(settings.default_bundle_dir))
    from detector import BundleError, load_bundle

    try:  # fail fast and clearly, before uvicorn starts: every check the workers' load will make
        load_bundle(settings.bundle_dir, "cpu", settings.bundle_sha256, settings.trusted_architecture_list)
    except BundleError as exc:
        print(f"detector-serve: error: cannot serve bundle {str(settings.bundle_dir)!r}: {exc}", file=sys.stderr)
        return 2

    os.environ.update(settings.to_env())
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # /metrics then aggregates every worker (each has its own model and counters).
        metrics_dir = tempfile.mkdtemp(prefix="detector-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)

    import uvicorn

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: any local client could then name
        # itself anyone, to the rate limit and the audit trail. Only the proxies named here are believed.
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        http=PROTOCOL,  # uvicorn's httptools protocol with head, time and connection limits
        # uvicorn's default of 5 s is shorter than importing PyTorch on a busy host: the workers would be
        # killed and restarted forever.
        timeout_worker_healthcheck=settings.worker_healthcheck_timeout_s,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
