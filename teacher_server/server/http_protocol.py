"""uvicorn's httptools connection (what `uvicorn[standard]` runs) with the two guards
uvicorn lacks: a request-head timeout and a connection limit. (The body's timeout is
`http_api.read_body`'s; an idle keep-alive connection is closed by uvicorn's own
timeout_keep_alive.)

It also hands a body chunk that finds none waiting to the app as it came from the parser,
not through uvicorn's copy into a bytearray and back out.

uvicorn waits forever for a request head that never completes and takes any number of
connections, so a client holding many half-sent connections could hold the server's sockets.
Here a head not complete within header_timeout_s (from the connection, or from the head's
first byte on a kept-alive one) gets 408 `request_timeout` and the connection closes; a
connection over max_connections gets 503 `not_ready` and closes.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from teacher_server.shared.errors import NotReady, RequestTimeout, TeacherError, status_of

OVER_LIMIT_RETRY_S = 1


def error_bytes(error: TeacherError) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection (written before any request)."""
    status = status_of(error)
    body = json.dumps(
        {"error": {"code": status.grpc, "name": status.name, "message": error.message}}
    ).encode()
    reason = HTTPStatus(status.http).phrase
    head = [
        f"HTTP/1.1 {status.http} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if error.retry_after_s is not None:
        head.append(f"retry-after: {max(1, round(error.retry_after_s))}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(*, header_timeout_s: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools connection class with these limits, for `uvicorn.Config(http=...)`."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._heads_begun = 0
            self._heads_done = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                error = NotReady(
                    f"server holds {len(self.connections) - 1} connections "
                    f"(max_connections {max_connections}); retry later",
                    retry_after_s=OVER_LIMIT_RETRY_S,
                )
                transport.write(error_bytes(error))
                transport.close()
                return
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._heads_begun += 1

        def on_headers_complete(self) -> None:
            self._heads_done += 1
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            # uvicorn appends every chunk to a bytearray that `receive` then copies out as
            # bytes: two copies of each body. A chunk that finds nothing waiting is kept as
            # it came (bytes of a bytes is the same object), so it is not copied at all.
            cycle = self.cycle
            upgrading = self.parser.should_upgrade() and self._should_upgrade()
            if cycle.body or upgrading or cycle.response_complete:
                if isinstance(cycle.body, bytes):
                    cycle.body = bytearray(cycle.body)
                super().on_body(body)
                return
            cycle.body = body  # type: ignore[assignment]
            if len(body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            cycle.message_event.set()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._heads_begun == self._heads_done:
                self._disarm()
            elif self._head_timer is None:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            waiting = self._heads_begun > self._heads_done or self._heads_done == 0
            if self.transport.is_closing() or not waiting:
                return
            error = RequestTimeout(
                f"request head not complete within {header_timeout_s:g}s (header_timeout_s)"
            )
            self.transport.write(error_bytes(error))
            self.transport.close()

    return GuardedHttpToolsProtocol
