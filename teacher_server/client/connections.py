"""The client's connections to one teacher endpoint: HTTP (httpx) or gRPC (grpcio), clear or TLS;
a gRPC target's one channel balances over its addresses (`endpoints`).

Both send an InferRequest and return an InferResult (or the model list), encoded and decoded
by `wire`; every failure is an exception of the error table, so the client's retries and
chunking are written once above them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, Protocol, cast

import grpc
import httpx

from teacher_server.client.endpoints import Endpoint
from teacher_server.client.tls import ClientTls, check_endpoint
from teacher_server.shared import wire
from teacher_server.shared.contract import InferRequest, InferResult, ModelList
from teacher_server.shared.errors import DeadlineExceeded, NotReady, TeacherError, error_from_answer

GRPC_MESSAGE_LIMIT = 1024 * 1024 * 1024
MAX_RECONNECT_BACKOFF_MS = 2000
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
    """Framed bodies (`wire.FRAMED_CONTENT_TYPE`) over HTTP/1.1 with keep-alive."""

    def __init__(self, url: str, token: str | None, tls: ClientTls | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            verify=tls.ssl_context() if tls is not None else True,
        )

    def infer(self, request: InferRequest, timeout_s: float) -> InferResult:
        pieces = wire.request_to_framed(request)
        with _http_errors(self.url):
            response = self._client.post(
                f"/v1/models/{request.model}/infer",
                # in pieces, with no msgpack copy of the images (h11 joins them once to send)
                content=cast(Iterator[bytes], iter(pieces)),
                headers={
                    "content-type": wire.FRAMED_CONTENT_TYPE,
                    "content-length": str(sum(len(piece) for piece in pieces)),
                    wire.TIMEOUT_HEADER: f"{timeout_s * 1000:.0f}",
                },
                timeout=timeout_s,
            )
        return wire.result_from_framed(_ok_body(response, self.url))

    def list_models(self, timeout_s: float) -> ModelList:
        with _http_errors(self.url):
            response = self._client.get("/v1/models", timeout=timeout_s)
        return wire.models_from_map(json.loads(_ok_body(response, self.url)))

    def close(self) -> None:
        self._client.close()


@contextlib.contextmanager
def _http_errors(url: str) -> Iterator[None]:
    """Turn httpx's connection failures and timeouts into the error table's classes."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise TimedOut(f"no answer from {url} in time ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise Unreachable(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc


def _ok_body(response: httpx.Response, url: str) -> bytes:
    """A 200 answer's body; any other answer raises the server's error."""
    if response.status_code == 200:
        return response.content
    retry_ms = response.headers.get(wire.RETRY_AFTER_KEY)
    try:
        error = json.loads(response.content)["error"]
        message, name = str(error["message"]), error.get("name")
    except (ValueError, KeyError, TypeError):
        message, name = response.text[:500], None
    raise error_from_answer(
        f"{message} (HTTP {response.status_code} from {url})",
        name=name,
        http=response.status_code,
        retry_after_s=float(retry_ms) / 1000.0 if retry_ms else None,
    )


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
