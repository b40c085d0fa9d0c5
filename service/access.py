"""Who may ask, and how often: optional API keys and per-client rate limits.

Keys come from ``DETECTOR_API_KEYS`` (comma-separated) and/or ``DETECTOR_API_KEYS_FILE`` (one per line,
``#`` comments; a Docker or Kubernetes secret). A request presents one as ``Authorization: Bearer KEY`` or
``X-API-Key: KEY``. Only the keys' SHA-256 digests are kept; a client is named by a short id derived from
its key (``key:1a2b3c4d``), or by its address when no keys are configured (``ip:10.0.0.7``): that name is
what the rate limit counts and the audit log records.

The rate limit is a token bucket per client, counted in images: ``DETECTOR_RATE_LIMIT_PER_S`` tokens a
second, up to ``DETECTOR_RATE_LIMIT_BURST`` at once. Each worker process counts on its own. A client
whose bucket is empty is refused before its body is read.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from pathlib import Path

__all__ = ["AccessError", "AccessMiddleware", "ApiKeys", "RateLimiter", "read_api_keys", "route_path"]

#: Shortest key accepted: a key is a secret, not a password to remember.
MIN_KEY_LENGTH = 16


def route_path(scope) -> str:
    """The path the app's router matches: the request's path less the ``root_path`` that a server
    (``uvicorn --root-path /api``) or a mount puts in front of it.  Which paths need a key, and which
    limits apply, are judged on this: under a root path the raw path is ``/api/predict``, never
    ``/predict``.  A root path with a trailing slash is cut the same way (more paths judged
    protected than the router serves, never fewer)."""
    path, root = scope.get("path", ""), (scope.get("root_path") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


class AccessError(Exception):
    """Refused: ``status`` 401 or 429, with the headers the answer needs."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def read_api_keys(inline: str, file: Path | None) -> list[str]:
    """The configured keys; raises ValueError for a missing file or a key too short to be a secret."""
    keys = [k.strip() for k in inline.split(",") if k.strip()]
    if file is not None:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {str(file)!r}: {exc.strerror or exc}") from exc
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    short = [k for k in keys if len(k) < MIN_KEY_LENGTH or any(c.isspace() for c in k)]
    if short:
        raise ValueError(f"{len(short)} API key(s) are shorter than {MIN_KEY_LENGTH} characters or contain "
                         f"spaces; use random keys, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return keys


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The accepted keys, kept as SHA-256 digests."""

    def __init__(self, keys: list[str]):
        self._digests = {_digest(k) for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def client(self, authorization: str | None, api_key: str | None, address: str | None) -> str:
        """The client's name for a request; raises :class:`AccessError` (401) when keys are required and
        the request has none that is accepted."""
        if not self.enabled:
            return f"ip:{address or 'unknown'}"
        presented = api_key or None  # an empty X-API-Key beside a bearer key does not hide it
        if presented is None and authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                presented = value.strip()
        challenge = {"WWW-Authenticate": "Bearer"}
        if not presented:
            raise AccessError(401, "unauthorized", "an API key is required: send it as 'Authorization: Bearer KEY' "
                                                   "or 'X-API-Key: KEY'", challenge)
        digest = _digest(presented)  # comparing digests leaks nothing about a key's characters
        if digest not in self._digests:
            raise AccessError(401, "unauthorized", "the API key is not accepted", challenge)
        return f"key:{digest[:8]}"


class RateLimiter:
    """Token buckets per client: ``rate`` images a second, ``burst`` at most at once (``rate == 0``: off).

    At most ``max_clients`` buckets are kept; the least recently seen is dropped first (it would have
    refilled anyway after ``burst / rate`` seconds).
    """

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000, clock=time.monotonic):
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, client: str, n: int = 1) -> None:
        """Raise what :meth:`take` would for ``n`` tokens, spending none: a client whose bucket is
        already empty is refused before its body is read."""
        if self.enabled:
            self._available(client, n, self.clock())

    def take(self, client: str, n: int = 1) -> None:
        """Spend ``n`` tokens of ``client``'s bucket or raise :class:`AccessError` (429, Retry-After)."""
        if not self.enabled:
            return
        now = self.clock()
        self._buckets[client] = (self._available(client, n, now) - n, now)

    def _available(self, client: str, n: int, now: float) -> float:
        """The tokens in ``client``'s bucket at ``now``, at least ``n``, or :class:`AccessError`.  The
        bucket becomes the most recently seen either way, so that a refused client is not the first
        dropped (which would hand it a full bucket)."""
        if n > self.burst:
            raise AccessError(429, "rate_limited", f"{n} images in one request, more than the burst of {self.burst} "
                                                   f"a client may send at once (DETECTOR_RATE_LIMIT_BURST)")
        tokens, when = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        if tokens < n:
            wait = math.ceil((n - tokens) / self.rate)
            raise AccessError(429, "rate_limited",
                              f"rate limit: {self.rate:g} images a second per client (DETECTOR_RATE_LIMIT_PER_S), "
                              f"bursts of {self.burst}; retry in {wait} s", {"Retry-After": str(wait)})
        return tokens


class AccessMiddleware:
    """Names the client of every request (``scope["state"]["client"]``) and, before a byte of the body
    is read, answers 401 on ``protected`` paths when API keys are configured and the request has no
    accepted one, and 429 on ``limited`` paths when the client's rate-limit bucket is already empty
    (``refused(code)`` is told of those).  The handler spends the request's images once it knows
    how many there are."""

    def __init__(self, app, keys: ApiKeys, protected: frozenset[str], limiter: RateLimiter | None = None,
                 limited: frozenset[str] = frozenset(), refused=None):
        self.app, self.keys, self.protected = app, keys, protected
        self.limiter, self.limited, self.refused = limiter, limited, refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k: v for k, v in scope.get("headers", []) if k in (b"authorization", b"x-api-key")}
        address = scope.get("client")[0] if scope.get("client") else None
        path = route_path(scope)
        try:
            client = self.keys.client(_text(headers.get(b"authorization")), _text(headers.get(b"x-api-key")), address)
        except AccessError as exc:
            if path in self.protected:
                await _refuse(exc, scope, receive, send)
                return
            client = f"ip:{address or 'unknown'}"  # open paths (health, docs) need no key
        if self.limiter is not None and path in self.limited:
            try:
                self.limiter.check(client)
            except AccessError as exc:
                if self.refused is not None:
                    self.refused(exc.code)
                await _refuse(exc, scope, receive, send)
                return
        scope.setdefault("state", {})["client"] = client
        await self.app(scope, receive, send)


async def _refuse(exc: AccessError, scope, receive, send) -> None:
    from starlette.responses import JSONResponse

    response = JSONResponse({"code": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)
    await response(scope, receive, send)


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
