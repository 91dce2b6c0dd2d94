"""The client's two wires: one request map in, one response map out, errors from the table.

Both transports take the same request fields (ARCHITECTURE.md contract), so the client's
logic (retries, endpoints, chunking) is written once above them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc
import httpx
import msgpack

from teacher_server._proto import teacher_pb2, teacher_pb2_grpc
from teacher_server.codec import (
    MSGPACK_CONTENT_TYPE,
    RETRY_AFTER_HEADER,
    RETRY_AFTER_METADATA,
    TIMEOUT_HEADER,
)
from teacher_server.errors import (
    DeadlineExceeded,
    NotReady,
    TeacherError,
    error_from_grpc,
    error_from_http,
)
from teacher_server.proto_codec import describe_fields, request_message, response_fields

GRPC_MESSAGE_LIMIT = 1024 * 1024 * 1024


class Unreachable(NotReady):
    """No answer at all from an endpoint (refused, reset, DNS): try another one."""


class Transport(Protocol):
    url: str

    def infer(self, fields: Mapping[str, Any], timeout_s: float) -> dict[str, Any]: ...
    async def infer_async(self, fields: Mapping[str, Any], timeout_s: float) -> dict[str, Any]: ...
    def describe(self, timeout_s: float) -> dict[str, Any]: ...
    async def describe_async(self, timeout_s: float) -> dict[str, Any]: ...
    def close(self) -> None: ...
    async def aclose(self) -> None: ...


def open_transport(url: str, token: str | None) -> Transport:
    """A transport for `http://host:port` or `grpc://host:port`."""
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return HttpTransport(url, token)
    if scheme == "grpc":
        return GrpcTransport(url, token)
    raise ValueError(f"teacher endpoint must start with http://, https:// or grpc://, got {url!r}")


class HttpTransport:
    """msgpack bodies over HTTP/1.1 with keep-alive (httpx)."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self._client = httpx.Client(base_url=self.url, headers=self._headers, limits=self._limits)
        self._async_client: httpx.AsyncClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None

    def _infer_args(self, fields: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
        return {
            "url": f"/v1/models/{fields['model']}/infer",
            "content": msgpack.packb(dict(fields), use_bin_type=True),
            "headers": {
                "content-type": MSGPACK_CONTENT_TYPE,
                TIMEOUT_HEADER: f"{timeout_s * 1000:.0f}",
            },
            "timeout": timeout_s,
        }

    def infer(self, fields: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
        with _http_errors(self.url):
            response = self._client.post(**self._infer_args(fields, timeout_s))
        return _http_body(response)

    async def infer_async(self, fields: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
        with _http_errors(self.url):
            response = await self._aclient().post(**self._infer_args(fields, timeout_s))
        return _http_body(response)

    def describe(self, timeout_s: float) -> dict[str, Any]:
        with _http_errors(self.url):
            response = self._client.get("/v1/models", timeout=timeout_s)
        return _http_body(response)

    async def describe_async(self, timeout_s: float) -> dict[str, Any]:
        with _http_errors(self.url):
            response = await self._aclient().get("/v1/models", timeout=timeout_s)
        return _http_body(response)

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._async_client is None or self._async_loop is not loop:
            self._async_client = httpx.AsyncClient(
                base_url=self.url, headers=self._headers, limits=self._limits
            )
            self._async_loop = loop
        return self._async_client

    def close(self) -> None:
        self._client.close()

    async def aclose(self) -> None:
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None
        self.close()


@contextlib.contextmanager
def _http_errors(url: str) -> Iterator[None]:
    """Turn httpx's connection failures and timeouts into the error table's classes."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise DeadlineExceeded(f"no answer from {url} in time ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise Unreachable(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc


def _http_body(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 200:
        if response.headers.get("content-type", "").startswith("application/json"):
            return dict(response.json())
        return dict(msgpack.unpackb(response.content, raw=False))
    retry_ms = response.headers.get(RETRY_AFTER_HEADER)
    retry_after = float(retry_ms) / 1000.0 if retry_ms else None
    try:
        message = json.loads(response.content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise error_from_http(response.status_code, message, retry_after)


class GrpcTransport:
    """Protobuf over one gRPC channel (sync) and one aio channel per event loop (async)."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self._target = urlsplit(url).netloc
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._options = [
            ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
            ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
        ]
        self._channel = grpc.insecure_channel(self._target, options=self._options)
        self._stub = teacher_pb2_grpc.TeacherStub(self._channel)  # type: ignore[no-untyped-call]
        self._aio_channel: grpc.aio.Channel | None = None
        self._aio_stub: teacher_pb2_grpc.TeacherStub | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None

    def infer(self, fields: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            reply = self._stub.Infer(
                request_message(fields), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _grpc_error(exc, self.url) from None
        return response_fields(reply)

    async def infer_async(self, fields: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            reply = await self._astub().Infer(
                request_message(fields), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _grpc_error(exc, self.url) from None
        return response_fields(reply)

    def describe(self, timeout_s: float) -> dict[str, Any]:
        try:
            reply = self._stub.ListModels(
                teacher_pb2.ListModelsRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _grpc_error(exc, self.url) from None
        return describe_fields(reply)

    async def describe_async(self, timeout_s: float) -> dict[str, Any]:
        try:
            reply = await self._astub().ListModels(
                teacher_pb2.ListModelsRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _grpc_error(exc, self.url) from None
        return describe_fields(reply)

    def _astub(self) -> teacher_pb2_grpc.TeacherStub:
        loop = asyncio.get_running_loop()
        if self._aio_stub is None or self._aio_loop is not loop:
            self._aio_channel = grpc.aio.insecure_channel(self._target, options=self._options)
            self._aio_stub = teacher_pb2_grpc.TeacherStub(self._aio_channel)  # type: ignore[no-untyped-call]
            self._aio_loop = loop
        return self._aio_stub

    def close(self) -> None:
        self._channel.close()

    async def aclose(self) -> None:
        if self._aio_channel is not None:
            await self._aio_channel.close(None)
            self._aio_channel = None
            self._aio_stub = None
        self.close()


def _grpc_error(exc: grpc.RpcError, url: str) -> TeacherError:
    call: Any = exc
    code: grpc.StatusCode = call.code()
    retry_after = None
    for key, value in call.trailing_metadata() or ():
        if key == RETRY_AFTER_METADATA:
            retry_after = float(value) / 1000.0
    return error_from_grpc(code, f"{call.details() or ''} ({url})", retry_after)
