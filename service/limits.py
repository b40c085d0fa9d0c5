"""The request-body byte caps, enforced while the body streams in.

Per request: a declared ``Content-Length`` over the cap is refused before a single body byte is read;
a body without one (chunked) is counted chunk by chunk and refused as soon as the count passes the
cap, so an oversized upload is never buffered or spooled whole.  The answer is a 413 JSON error.

In all: the body bytes received by the requests being served may add up to at most ``in_flight_cap``;
a request whose body would pass it gets 503 with ``Retry-After``.  Each request holds its body, and
more while it is parsed and decoded, until it is answered, so without this many concurrent uploads,
each under its own cap, add up to more memory than the process has.  Bytes are counted as they
arrive, not as declared: a client that declares a large body and sends nothing holds nothing.  One
client address may hold at most ``per_client_cap``, so that a single client holding uploads open
cannot lock every other one out.
(uvicorn discards whatever the client still sends and keeps the connection usable.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access import route_path

__all__ = ["BodyLimitMiddleware"]


class _BodyTooLarge(Exception):
    pass


class _TooMuchInFlight(Exception):
    pass


class BodyLimitMiddleware:
    """413 for request bodies over ``limit_for(path)`` bytes; 503 for one that would take the bodies
    in flight over ``in_flight_cap`` bytes."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], setting_for: Callable[[str], str],
                 in_flight_cap: int, in_flight_setting: str, per_client_cap: int | None = None):
        self.app = app
        self.limit_for = limit_for
        self.setting_for = setting_for
        self.in_flight_cap = in_flight_cap
        self.in_flight_setting = in_flight_setting
        self.in_flight = 0  # body bytes of the requests being served: one event loop, so no lock
        self.per_client_cap = in_flight_cap if per_client_cap is None else per_client_cap
        self.per_client: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        limit = self.limit_for(path)
        declared: int | None = None
        raw = Headers(scope=scope).get("content-length")
        if raw is not None:
            try:
                declared = int(raw)
            except ValueError:
                declared = None
        received = 0
        held = 0  # this request's share of self.in_flight
        client = (scope.get("client") or ("",))[0]
        exceeded = False
        busy = False
        started = False

        def hold(total: int) -> None:
            nonlocal held, busy
            if total > held:
                more = total - held
                if (self.in_flight + more > self.in_flight_cap
                        or self.per_client[client] + more > self.per_client_cap):
                    busy = True
                    raise _TooMuchInFlight
                self.in_flight += more
                self.per_client[client] += more
                held = total

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if declared is not None and declared > limit:
                exceeded = True
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
                hold(received)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if (exceeded or busy) and not started:
                return  # the app's own answer to the aborted read is replaced by the 413 or 503 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            if declared is not None and declared > limit:
                # Refused before the app runs, whatever the route: one that reads no body would answer,
                # and the connection would then have to swallow the declared bytes.
                exceeded = True
                raise _BodyTooLarge
            await self.app(scope, limited_receive, guarded_send)
        except (_BodyTooLarge, _TooMuchInFlight):
            pass
        except Exception:
            if not (exceeded or busy):
                raise
        finally:
            self.in_flight -= held
            self.per_client[client] -= held
            if self.per_client[client] <= 0:
                del self.per_client[client]
        if busy and not started:
            size = f"{declared:,} bytes" if declared is not None else f"{received:,} bytes so far"
            response = JSONResponse(
                {"code": "overloaded",
                 "detail": f"the request bodies being served would pass {self.in_flight_cap:,} bytes in all, or "
                           f"this client's share of {self.per_client_cap:,}, with this one ({size}; "
                           f"{self.in_flight_setting}); retry shortly"},
                status_code=503, headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        if exceeded and not started:
            size = f"{declared:,} bytes" if declared is not None and declared > limit else f"more than {limit:,} bytes"
            response = JSONResponse(
                {"code": "request_too_large",
                 "detail": f"the request body is {size}; the limit for {path} is {limit:,} bytes "
                           f"({self.setting_for(path)})"},
                status_code=413,
            )
            await response(scope, receive, send)
