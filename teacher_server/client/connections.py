"""The client's connections to one teacher endpoint: HTTP (http.client) or gRPC (grpcio), clear
or TLS; a gRPC target's one channel balances over its addresses (`teacher_server.shared.endpoints`).

Both send an InferRequest and return an InferResult (or the model list), encoded and decoded
by `wire`; every failure is an exception of the error table, so the client's retries and
chunking are written once above them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc

from teacher_server.client.tls import ClientTls, check_endpoint
from teacher_server.shared import wire
from teacher_server.shared.contract import InferRequest, InferResult, ModelList
from teacher_server.shared.endpoints import Endpoint
from teacher_server.shared.errors import DeadlineExceeded, NotReady, TeacherError, error_from_answer

GRPC_MESSAGE_LIMIT = 1024 * 1024 * 1024
MAX_IDLE_HTTP_CONNECTIONS = 64
MAX_RECONNECT_BACKOFF_MS = 2000
MIN_RESOLVE_INTERVAL_MS = 1000
INFER_METHOD = f"/{wire.GRPC_SERVICE}/Infer"
LIST_MODELS_METHOD = f"/{wire.GRPC_SERVICE}/ListModels"
BALANCED_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": wire.GRPC_SERVICE},
    }
)
"""A gRPC target's channel: each request to the next healthy address (grpcio's own policy)."""


class Unreachable(NotReady):
    """No answer at all from an endpoint (refused, reset, DNS): try another one."""


class TimedOut(DeadlineExceeded):
    """This client stopped waiting for an answer (the server's own 504 is DeadlineExceeded)."""


class Connection(Protocol):
    """One endpoint of a teacher."""

    url: str

    def infer(self, request: InferRequest, timeout_s: float) -> InferResult: ...

    def list_models(self, timeout_s: float) -> ModelList: ...

    def close(self) -> None: ...


def open_connection(
    url: str,
    token: str | None,
    *,
    tls: ClientTls | None = None,
    allow_insecure_token: bool = False,
) -> Connection:
    """A connection to one endpoint (`endpoints.parse_endpoint`: `http(s)://host:port`,
    `grpc(s)://host:port` or a gRPC target such as `dns:///teacher:50051`).

    ValueError for a malformed endpoint, a token in clear text to a non-loopback host (unless
    allowed), or TLS files for a clear-text endpoint (see `tls.check_endpoint`).
    """
    endpoint = check_endpoint(url, token=token, tls=tls, allow_insecure_token=allow_insecure_token)
    secure = (tls or ClientTls()) if endpoint.secure else None
    if endpoint.transport == "http":
        return HttpConnection(endpoint.address, token, secure)
    return GrpcConnection(endpoint, token, secure)


class HttpConnection:
    """Framed bodies (`wire.FRAMED_CONTENT_TYPE`) over HTTP/1.1 keep-alive connections.

    The standard library's `http.client`, one connection per request in flight, kept for the
    next: it costs the student under half the CPU of httpx per request (`bench/
    student_throughput.py`), and sends the pixels from where they lie, with no join.
    """

    def __init__(self, url: str, token: str | None, tls: ClientTls | None = None) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        secure = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if secure else 80)
        self._context = (tls or ClientTls()).ssl_context() if secure else None
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def infer(self, request: InferRequest, timeout_s: float) -> InferResult:
        pieces = wire.request_to_framed(request)
        headers = {
            "content-type": wire.FRAMED_CONTENT_TYPE,
            "content-length": str(sum(len(piece) for piece in pieces)),
            wire.TIMEOUT_HEADER: f"{timeout_s * 1000:.0f}",
        }
        path = f"/v1/models/{request.model}/infer"
        answer = self._exchange(_Request("POST", path, pieces, headers, timeout_s))
        return wire.result_from_framed(answer.ok_body(self.url))

    def list_models(self, timeout_s: float) -> ModelList:
        answer = self._exchange(_Request("GET", "/v1/models", [], {}, timeout_s))
        return wire.models_from_map(json.loads(answer.ok_body(self.url)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _exchange(self, request: _Request) -> _Answer:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        with _http_errors(self.url):
            if connection is not None:
                try:
                    return self._send(connection, request)
                except ConnectionError:
                    # A kept-alive connection the server had closed (a restart, its idle
                    # timeout): the request is tried once more on a fresh one.
                    connection.close()
            return self._send(self._connect(request.timeout_s), request)

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._context is not None:
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout_s, context=self._context
            )
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        connection.connect()
        assert connection.sock is not None
        # The header block and the pixels go out as separate writes: no Nagle wait between.
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _send(self, connection: http.client.HTTPConnection, request: _Request) -> _Answer:
        pieces = request.pieces
        try:
            assert connection.sock is not None
            connection.sock.settimeout(request.timeout_s)
            connection.putrequest(request.method, request.path, skip_accept_encoding=True)
            for name, value in {**self._headers, **request.headers}.items():
                connection.putheader(name, value)
            connection.endheaders(pieces[0] if pieces else None)
            for piece in pieces[1:]:
                connection.send(piece)
            response = connection.getresponse()
            answer = _Answer(
                response.status, response.getheader(wire.RETRY_AFTER_KEY), response.read()
            )
        except BaseException:
            connection.close()
            raise
        if response.will_close:
            connection.close()
        else:
            with self._lock:
                if self._closed or len(self._idle) >= MAX_IDLE_HTTP_CONNECTIONS:
                    connection.close()
                else:
                    self._idle.append(connection)
        return answer


@dataclass(frozen=True)
class _Request:
    """An HTTP request as `HttpConnection` sends it: the body in pieces, sent as they are."""

    method: str
    path: str
    pieces: Sequence[bytes | memoryview]
    headers: dict[str, str]
    timeout_s: float


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer: its status, its retry-after header and its body."""

    status: int
    retry_after_ms: str | None
    body: bytes

    def ok_body(self, url: str) -> bytes:
        """A 200 answer's body; any other answer raises the server's error."""
        if self.status == 200:
            return self.body
        try:
            error = json.loads(self.body)["error"]
            message, name = str(error["message"]), error.get("name")
        except (ValueError, KeyError, TypeError):
            message, name = self.body[:500].decode(errors="replace"), None
        raise error_from_answer(
            f"{message} (HTTP {self.status} from {url})",
            name=name,
            http=self.status,
            retry_after_s=float(self.retry_after_ms) / 1000.0 if self.retry_after_ms else None,
        )


@contextlib.contextmanager
def _http_errors(url: str) -> Iterator[None]:
    """Turn connection failures and timeouts into the error table's classes."""
    try:
        yield
    except TimeoutError as exc:
        raise TimedOut(f"no answer from {url} in time ({type(exc).__name__})") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc


class GrpcConnection:
    """Protobuf messages over one gRPC channel; `wire` encodes and decodes their bytes."""

    def __init__(self, endpoint: Endpoint, token: str | None, tls: ClientTls | None = None) -> None:
        self.url = endpoint.url
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
            ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
            # A teacher that comes back is used within seconds (grpcio waits up to 120 s).
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ]
        if endpoint.balanced:
            options.append(("grpc.service_config", BALANCED_SERVICE_CONFIG))
            # A target's name is looked up again when a connection to it ends (a replica gone,
            # or the teacher's max connection age): within a second, not grpcio's 30 s, so a
            # replica added by a scale-up gets requests as soon as connections roll over.
            options.append(("grpc.dns_min_time_between_resolutions_ms", MIN_RESOLVE_INTERVAL_MS))
        if tls is not None and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        if tls is None:
            self._channel = grpc.insecure_channel(endpoint.address, options=options)
        else:
            self._channel = grpc.secure_channel(
                endpoint.address, tls.grpc_credentials(), options=options
            )
        # No (de)serializers: the methods take and return the messages' bytes.
        self._infer = self._channel.unary_unary(INFER_METHOD, None, None)
        self._list_models = self._channel.unary_unary(LIST_MODELS_METHOD, None, None)

    def infer(self, request: InferRequest, timeout_s: float) -> InferResult:
        body = self._call(self._infer, wire.request_to_protobuf(request), timeout_s)
        return wire.result_from_protobuf(body)

    def list_models(self, timeout_s: float) -> ModelList:
        return wire.models_from_protobuf(self._call(self._list_models, b"", timeout_s))

    def _call(self, method: Any, body: bytes, timeout_s: float) -> bytes:
        try:
            answer: bytes = method(body, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _grpc_error(exc, self.url) from None
        return answer

    def close(self) -> None:
        self._channel.close()


def _grpc_error(exc: grpc.RpcError, url: str) -> TeacherError:
    call: Any = exc
    code: grpc.StatusCode = call.code()
    trailing = dict(call.trailing_metadata() or ())
    name = trailing.get(wire.ERROR_NAME_KEY)
    message = f"{call.details() or ''} (gRPC {code.name} from {url})"
    if name is None and code == grpc.StatusCode.UNAVAILABLE:
        return Unreachable(f"cannot reach {url}: {message}")
    if name is None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimedOut(f"no answer from {url} in time: {message}")
    retry_ms = trailing.get(wire.RETRY_AFTER_KEY)
    return error_from_answer(
        message,
        name=name,
        grpc=code.name,
        retry_after_s=float(retry_ms) / 1000.0 if retry_ms else None,
    )
