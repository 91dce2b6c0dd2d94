"""HTTP transport (FastAPI): read the body, decode it (`wire`), call the lifecycle, encode.

Errors answer as JSON `{"error": {"code", "name", "message"}}`: the error table's gRPC code
name, its stable name, and what was wrong, with the table's HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Iterable
from functools import partial
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.registry import Collector

from teacher_server import __version__
from teacher_server.server.lifecycle import Lifecycle
from teacher_server.server.stats import StatsCollector
from teacher_server.shared import wire
from teacher_server.shared.errors import (
    InvalidRequest,
    NotReady,
    RequestTimeout,
    TeacherError,
    status_of,
)

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499
MSGPACK_TYPES = frozenset(
    {wire.MSGPACK_CONTENT_TYPE, "application/x-msgpack", "application/vnd.msgpack"}
)


def error_response(error: TeacherError) -> JSONResponse:
    """The one mapping from a TeacherError to an HTTP answer."""
    status = status_of(error)
    body = {"error": {"code": status.grpc, "name": status.name, "message": error.message}}
    return JSONResponse(body, status_code=status.http, headers=error_headers(error))


def error_headers(error: TeacherError) -> dict[str, str]:
    """The headers of an error answer: the retry hint, and `connection: close` after a
    request that arrived too slowly."""
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
        headers[wire.RETRY_AFTER_KEY] = wire.retry_after_ms(error.retry_after_s)
    if isinstance(error, RequestTimeout):
        headers["connection"] = "close"
    return headers


async def read_body(request: Request, lifecycle: Lifecycle) -> bytes:
    """The request body, refused as soon as it is known to pass max_request_bytes, or when it
    has not all arrived within body_timeout_s (a slow or short body cannot hold a connection)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        lifecycle.check_size(int(declared))
    chunks, size = [], 0
    timeout_s = lifecycle.config.server.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                lifecycle.check_size(size, partial=True)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"body not complete within {timeout_s:g}s (body_timeout_s); {size} bytes arrived"
            + (f" of {declared}" if declared is not None else "")
        ) from None
    return b"".join(chunks)


def peer_of(request: Request) -> str:
    """The connection a request came on, the client it is batched as without a client_id."""
    client = request.client
    return "" if client is None else f"http:{client.host}:{client.port}"


def _timeout_s(request: Request) -> float | None:
    value = request.headers.get(wire.TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        timeout_ms = float(value)
    except ValueError:
        raise InvalidRequest(
            f"{wire.TIMEOUT_HEADER} must be a number of milliseconds, got {value!r}"
        ) from None
    if not math.isfinite(timeout_ms) or timeout_ms <= 0:
        raise InvalidRequest(f"{wire.TIMEOUT_HEADER} must be > 0, got {value!r}")
    return timeout_ms / 1000.0


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, or cancel it when the client hangs up first (its queued images are dropped)."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        hangup.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_http_app(lifecycle: Lifecycle, collectors: Iterable[Collector] = ()) -> FastAPI:
    """The FastAPI app of one teacher server; with a token, no /docs or /openapi.json (they
    cannot ask for one). /metrics adds `collectors` and the process's own (RSS, CPU, fds)."""
    public_docs = lifecycle.config.server.auth_token is None
    app = FastAPI(
        title="kdserve teacher",
        version=__version__,
        docs_url="/docs" if public_docs else None,
        openapi_url="/openapi.json" if public_docs else None,
        redoc_url=None,
    )
    metrics_registry = CollectorRegistry(auto_describe=True)
    metrics_registry.register(StatsCollector(lifecycle.model_stats))
    ProcessCollector(registry=metrics_registry)
    for collector in collectors:
        metrics_registry.register(collector)

    @app.exception_handler(TeacherError)
    async def _teacher_error(_: Request, error: TeacherError) -> JSONResponse:
        return error_response(error)

    @app.post("/v1/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        lifecycle.authorize(request.headers.get("authorization"))
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        framed = content_type == wire.FRAMED_CONTENT_TYPE
        if not framed and content_type not in MSGPACK_TYPES:
            raise InvalidRequest(
                f"content-type must be {wire.MSGPACK_CONTENT_TYPE} or {wire.FRAMED_CONTENT_TYPE}, "
                f"got {content_type or 'none'!r}"
            )
        body = await read_body(request, lifecycle)
        from_body = wire.request_from_framed if framed else wire.request_from_msgpack
        decode = partial(from_body, body, path_model=name)
        answer = lifecycle.infer(decode, timeout_s=_timeout_s(request), peer=peer_of(request))
        result = await unless_disconnected(request, answer)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if framed:
            return Response(b"".join(wire.result_to_framed(result)), media_type=content_type)
        return Response(wire.result_to_msgpack(result), media_type=wire.MSGPACK_CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        lifecycle.authorize(request.headers.get("authorization"))
        return wire.models_to_map(lifecycle.describe())

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, Any]:
        lifecycle.authorize(request.headers.get("authorization"))
        return lifecycle.stats()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        lifecycle.authorize(request.headers.get("authorization"))
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        if not lifecycle.ready:
            raise NotReady("models are still loading or the server is shutting down")
        return {"status": "ready"}

    return app
