"""The request-body byte cap, enforced while the body streams in.

A declared ``Content-Length`` over the cap is refused before a single body byte is read; a body
without one (chunked) is counted chunk by chunk and refused as soon as the count passes the cap,
so an oversized upload is never buffered or spooled whole.  The answer is a 413 JSON error.
(uvicorn discards whatever the client still sends and keeps the connection usable.)
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware"]


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for request bodies over ``limit_for(path)`` bytes."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], setting_for: Callable[[str], str]):
        self.app = app
        self.limit_for = limit_for
        self.setting_for = setting_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.limit_for(path)
        declared: int | None = None
        raw = Headers(scope=scope).get("content-length")
        if raw is not None:
            try:
                declared = int(raw)
            except ValueError:
                declared = None
        received = 0
        exceeded = False
        started = False

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
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's own answer to the aborted read is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            size = f"{declared:,} bytes" if declared is not None and declared > limit else f"more than {limit:,} bytes"
            response = JSONResponse(
                {"code": "request_too_large",
                 "detail": f"the request body is {size}; the limit for {path} is {limit:,} bytes "
                           f"({self.setting_for(path)})"},
                status_code=413,
            )
            await response(scope, receive, send)
