"""The HTTP connection limits uvicorn does not have, enforced where requests are parsed.

uvicorn's httptools protocol reads request heads of any size and any number of headers, waits forever
for a head or a body that trickles in a byte at a time (or never comes), and accepts connections until
the process runs out of file descriptors. :class:`GuardedHttpToolsProtocol` is that protocol with:

- a cap on the request head's bytes and on its number of headers, and on a chunked body's trailer
  section (header fields after the last chunk): 431;
- a deadline for the head, counted from the connection's first moment (or, on a kept-alive connection,
  from the next request's first byte): 408 and close;
- a deadline for the body, counted from the end of the head: 408 (when no answer has started) and close;
- a cap on open connections per worker, and per client address: 503 and close, before any byte is read.

``detector-serve`` installs it (``uvicorn.run(http=PROTOCOL)``); the limits come from the
``DETECTOR_*`` settings in the worker's environment.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from functools import lru_cache

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .settings import Settings

__all__ = ["PROTOCOL", "ConnectionLimits", "GuardedHttpToolsProtocol", "connection_limits"]

#: What ``uvicorn.run(http=...)`` is given: an import string, so that spawned workers load it too.
PROTOCOL = "service.protocol:GuardedHttpToolsProtocol"

log = logging.getLogger("service.protocol")


class ConnectionLimits:
    """The limits, in the units the protocol checks them in."""

    def __init__(self, settings: Settings):
        self.max_header_bytes = settings.max_header_bytes
        self.max_headers = settings.max_headers
        self.header_timeout = settings.header_timeout_s
        self.body_timeout = settings.body_timeout_s
        self.max_connections = settings.effective_max_connections
        self.max_connections_per_client = settings.max_connections_per_client


@lru_cache(maxsize=1)
def connection_limits() -> ConnectionLimits:
    """The limits from this process's ``DETECTOR_*`` environment (read once per worker)."""
    return ConnectionLimits(Settings())


#: Open connections per client address, in this worker.
_per_client: Counter[str] = Counter()


class _HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with caps on head size, header count, head and body time, and
    connections (see the module's docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = connection_limits()
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_bytes = 0  # raw bytes of the head received so far
        self._head_fields = 0  # header name/value bytes and URL bytes the parser handed over
        self._headers_seen = 0
        self._body_done = True  # the current request's body has been read whole
        self._began = False  # a request started inside the chunk being parsed
        self._maybe_trailer = False  # after a chunk-size line, before its data: the last chunk's trailer?
        self._trailer_bytes = 0  # raw bytes of reads that were all trailer, then the fields' own
        self._trailer_fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._client_key: str | None = None

    # -- connections ----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._client_key = self.client[0] if self.client else None
        if self._client_key is not None:
            _per_client[self._client_key] += 1
        limits = self.limits
        if len(self.connections) > limits.max_connections:
            self._refuse(503, "too_many_connections",
                         f"the server holds its maximum of {limits.max_connections} connections "
                         f"(DETECTOR_MAX_CONNECTIONS); retry shortly", retry_after=True)
            return
        per_client = limits.max_connections_per_client
        if per_client and self._client_key is not None and _per_client[self._client_key] > per_client:
            self._refuse(503, "too_many_connections",
                         f"this client holds its maximum of {per_client} open connections "
                         f"(DETECTOR_MAX_CONNECTIONS_PER_CLIENT); reuse them or close some", retry_after=True)
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._client_key is not None:
            _per_client[self._client_key] -= 1
            if _per_client[self._client_key] <= 0:
                del _per_client[self._client_key]
            self._client_key = None
        super().connection_lost(exc)

    # -- the request head -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        # Only a chunk that arrives inside a head counts as head bytes: after an early 413 the chunk
        # that ends the refused body also ends in the head state, yet is mostly that body's tail.
        head_before, trailer_before = self._in_head, self._maybe_trailer
        self._began = False
        if self._in_head and self._head_timer is None:
            self._arm_head_timer()  # the first byte of a request on a kept-alive connection
        try:
            self.parser.feed_data(data)
        except _HeadTooLarge:
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                return  # already answered 431
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self.transport.is_closing():
            return
        # The parser keeps a partial header in memory until it is complete: count the raw bytes of a
        # chunk that is all head. One in which a request began may also hold earlier, complete
        # requests (pipelined): its part of the new head goes uncounted, at most one read, and the
        # reads after it count whole.
        if head_before and self._in_head and not self._began:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._head_too_large()
        # Trailer fields after a chunked body's last chunk are kept in memory the same way (and grown
        # by copying, at a cost quadratic in their size): a chunk that is all trailer counts too.
        elif trailer_before and self._maybe_trailer and not self._began:
            self._trailer_bytes += len(data)
            if self._trailer_bytes > self.limits.max_header_bytes:
                self._trailer_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._began = True
        self._maybe_trailer = False
        self._head_bytes = self._head_fields = self._headers_seen = 0

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers requests the parser refuses in plain text; every error here is JSON.
        self._refuse(400, "bad_request",
                     "the request is not valid HTTP/1.1 (its request line, a header, the body's length or its "
                     "chunking) and was not read")

    # -- a chunked body's trailer -----------------------------------------------------------------
    def on_chunk_header(self) -> None:
        self._maybe_trailer, self._trailer_bytes, self._trailer_fields = True, 0, 0  # size 0 has no data

    def on_body(self, body: bytes) -> None:
        self._maybe_trailer = False
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        self._maybe_trailer = False

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a trailer field, after a chunked body: counted on its own, as a head is
            self._trailer_bytes += len(name) + len(value) + 4
            self._trailer_fields += 1
            if self._trailer_bytes > self.limits.max_header_bytes or self._trailer_fields > self.limits.max_headers:
                self._trailer_too_large()
                raise _HeadTooLarge
            super().on_header(name, value)
            return
        self._headers_seen += 1
        if self._headers_seen > self.limits.max_headers:
            self._refuse(431, "too_many_headers",
                         f"the request has more than {self.limits.max_headers} headers (DETECTOR_MAX_HEADERS)")
            raise _HeadTooLarge
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # The whole head: "METHOD URL HTTP/1.1\r\n", each "Name: value\r\n", and the blank line.
        self._count_head(len(self.parser.get_method()) + len(" HTTP/1.1\r\n\r\n") + 1)
        self._in_head = False
        self._body_done = False
        self._cancel_head_timer()
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_done, self._maybe_trailer = True, False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self.cycle is not None and self.cycle.response_complete and not self.pipeline:
            self._in_head = True  # answered early (a 413): the rest of that body has now been read
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_done and not self.pipeline and not self.transport.is_closing():
            self._in_head = True  # the next request's head: its timer starts with its first byte

    # -- limits ---------------------------------------------------------------------------------
    def _count_head(self, n: int) -> None:
        self._head_fields += n
        if self._head_fields > self.limits.max_header_bytes:
            self._head_too_large()
            raise _HeadTooLarge

    def _head_too_large(self) -> None:
        self._refuse(431, "headers_too_large",
                     f"the request head is over {self.limits.max_header_bytes} bytes (DETECTOR_MAX_HEADER_BYTES)")

    def _trailer_too_large(self) -> None:
        if self.cycle is not None:  # the app sees the client gone: its reads end, its writes are dropped
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        detail = (f"the chunked body's trailer fields are over {self.limits.max_header_bytes} bytes "
                  f"(DETECTOR_MAX_HEADER_BYTES) or {self.limits.max_headers} fields (DETECTOR_MAX_HEADERS)")
        if self.cycle is None or not self.cycle.response_started:
            self._refuse(431, "headers_too_large", detail)
        else:
            self._cancel_timers()
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            # An idle kept-alive connection is uvicorn's keep-alive timeout's business; this is a head
            # that has not arrived (or not finished arriving) in time.
            self._refuse(408, "request_timeout",
                         f"the request head did not arrive within {self.limits.header_timeout:g} s "
                         f"(DETECTOR_HEADER_TIMEOUT_S)")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.cycle is None or not self.cycle.more_body:
            return
        # The app sees the client gone (its reads end, its writes are dropped) ...
        self.cycle.disconnected = True
        self.cycle.message_event.set()
        if not self.cycle.response_started:  # ... and the client, when nothing was answered yet, a 408.
            self._refuse(408, "request_timeout",
                         f"the request body did not arrive within {self.limits.body_timeout:g} s "
                         f"(DETECTOR_BODY_TIMEOUT_S)")
        else:
            self.transport.close()

    def _refuse(self, status: int, code: str, detail: str, retry_after: bool = False) -> None:
        """Answer ``status`` with the service's JSON error body and close the connection."""
        self._cancel_timers()
        self._in_head = False
        body = json.dumps({"code": code, "detail": detail}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n", b"content-length: ", str(len(body)).encode(), b"\r\n",
                 b"connection: close\r\n"]
        if retry_after:
            head.append(b"retry-after: 1\r\n")
        self.transport.write(b"".join(head) + b"\r\n" + body)
        self.transport.close()
        log.warning("refused %s: %s %s", "%s:%d" % self.client if self.client else "a client", status, code)
