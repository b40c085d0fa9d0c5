"""What was flagged: a structured audit line per flagged image, and an optional quarantine of the images.

Every image the detector flags gives one JSON line on the ``service.audit`` logger (and, with
``DETECTOR_AUDIT_LOG``, appended to that file): request id, UTC time, client, route, the image's
SHA-256, label, score, uncanny-valley flag and the bundle's hash. With ``DETECTOR_QUARANTINE_DIR`` the
flagged uploads are kept there as ``<sha256>.<format>``, written whole or not at all (temporary name,
then rename) by one background thread that finishes its queue before the server stops. The directory
holds at most ``DETECTOR_QUARANTINE_MAX_BYTES``: once full, new images are not kept, and their audit
line says so (``"quarantined": "full"``). A line the file cannot take (a full disk) does not fail the
request that was answered: the logger still has it, the error is logged, and the caller counts it.

Every response carries ``X-Request-ID`` (the client's own, when it sent a sane one).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AuditTrail", "RequestIdMiddleware", "request_id"]

log = logging.getLogger("service.audit")

_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(scope: Scope) -> str:
    """The id :class:`RequestIdMiddleware` gave this request."""
    return scope.get("state", {}).get("request_id", "")


class RequestIdMiddleware:
    """Gives each request an id (the client's ``X-Request-ID`` if sane, else a new one) and echoes it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), "")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class AuditTrail:
    """Audit lines for flagged images, and the quarantine (see the module's docstring)."""

    def __init__(self, log_file: Path | None, quarantine_dir: Path | None, quarantine_max_bytes: int):
        self.log_file = Path(log_file) if log_file else None
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else None
        self.quarantine_max_bytes = quarantine_max_bytes
        self._lock = threading.Lock()
        self._file = None
        self._writer: ThreadPoolExecutor | None = None
        self._quarantined_bytes = 0
        self._kept: set[str] = set()  # names written or queued
        self.dropped = 0  # flagged images not kept because the quarantine was full

    def open(self) -> None:
        """Open the audit file and the quarantine (raises OSError when they cannot be written)."""
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.log_file, "a", buffering=1, encoding="utf-8")  # line-buffered
        if self.quarantine_dir is not None:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.quarantine_dir.glob(".*.partial"):  # from a process killed mid-write
                leftover.unlink(missing_ok=True)
            files = [p for p in self.quarantine_dir.iterdir() if p.is_file()]
            self._kept = {p.name for p in files}
            self._quarantined_bytes = sum(p.stat().st_size for p in files)
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quarantine")

    def close(self) -> None:
        """Finish every queued quarantine write, then close the audit file: nothing is lost on stop."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:  # the last buffered lines: the logger has them
                log.error("audit log %s: cannot write its last lines: %s", self.log_file, exc)
            self._file = None

    def record(self, *, request_id: str, client: str, route: str, bundle_sha256: str,
               flagged: list[tuple[int, bytes, str, Any]]) -> int:
        """One audit line per flagged image: ``(index in the request, upload bytes, format, prediction)``.
        Returns how many lines the audit file could not take (they are on the logger all the same)."""
        failed = 0
        when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        for index, data, fmt, prediction in flagged:
            digest = hashlib.sha256(data).hexdigest()
            entry = {
                "event": "flagged", "time": when, "request_id": request_id, "client": client, "route": route,
                "index": index, "image_sha256": digest, "bytes": len(data), "format": fmt,
                "label": prediction.label, "class_name": prediction.class_name,
                "adversarial_score": prediction.adversarial_score, "uncanny_valley": prediction.uncanny_valley,
                "bundle_sha256": bundle_sha256,
                "quarantined": self._quarantine(digest, fmt, data),
            }
            line = json.dumps(entry, ensure_ascii=False)
            log.info("%s", line)
            if self._file is not None:
                with self._lock:
                    try:
                        self._file.write(line + "\n")
                    except OSError as exc:  # a full disk: the answer stands, the logger line above is the record
                        failed += 1
                        log.error("audit log %s: cannot write the line above: %s", self.log_file, exc)
        return failed

    def _quarantine(self, digest: str, fmt: str, data: bytes) -> str | None:
        """Queue the image for the quarantine; returns its file name, "full", or None (no quarantine)."""
        if self._writer is None:
            return None
        name = f"{digest}.{fmt.lower() or 'bin'}"
        with self._lock:
            if name in self._kept:
                return name
            if self._quarantined_bytes + len(data) > self.quarantine_max_bytes:
                self.dropped += 1
                return "full"
            self._quarantined_bytes += len(data)
            self._kept.add(name)
        self._writer.submit(self._write, name, data)
        return name

    def _write(self, name: str, data: bytes) -> None:
        partial = self.quarantine_dir / f".{name}.partial"
        try:
            with open(partial, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, self.quarantine_dir / name)
        except OSError as exc:
            log.error("quarantine: cannot write %s: %s", name, exc)
            partial.unlink(missing_ok=True)
            with self._lock:
                self._quarantined_bytes -= len(data)
                self._kept.discard(name)
