"""HTTP front end (FastAPI): decode msgpack, call the core, encode msgpack, map errors.

Errors answer as JSON `{"error": {"code", "message"}}` with the status of the error table.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgpack
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from teacher_server import __version__
from teacher_server.codec import (
    MSGPACK_CONTENT_TYPE,
    RETRY_AFTER_HEADER,
    TIMEOUT_HEADER,
    result_to_wire,
)
from teacher_server.core import TeacherCore
from teacher_server.errors import InvalidRequest, NotReady, RequestTooLarge, TeacherError
from teacher_server.stats import StatsCollector

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499
MSGPACK_TYPES = frozenset(
    {MSGPACK_CONTENT_TYPE, "application/x-msgpack", "application/vnd.msgpack"}
)


def error_response(error: TeacherError) -> JSONResponse:
    """The one mapping from a TeacherError to an HTTP answer."""
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
        headers[RETRY_AFTER_HEADER] = str(math.ceil(error.retry_after_s * 1000))
    body = {"error": {"code": error.code_name, "message": error.message}}
    return JSONResponse(body, status_code=error.http_status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(
            f"body of {declared} bytes is over the limit of {limit} bytes (max_request_bytes)"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"body is over the limit of {limit} bytes (max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_msgpack(body: bytes) -> Any:
    """msgpack bytes -> Python values; extension types are never turned into objects."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise InvalidRequest(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from None


def _timeout_s(request: Request) -> float | None:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        timeout_ms = float(value)
    except ValueError:
        raise InvalidRequest(
            f"{TIMEOUT_HEADER} must be a number of milliseconds, got {value!r}"
        ) from None
    if not math.isfinite(timeout_ms) or timeout_ms <= 0:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be > 0, got {value!r}")
    return timeout_ms / 1000.0


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, or cancel it when the client hangs up first (its queued images are dropped)."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
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


def create_http_app(core: TeacherCore) -> FastAPI:
    """The FastAPI app of one teacher server."""
    app = FastAPI(title="kdserve teacher", version=__version__, docs_url="/docs", redoc_url=None)
    metrics_registry = CollectorRegistry(auto_describe=True)
    metrics_registry.register(StatsCollector(core.registry.all_stats))
    limit = core.config.server.max_request_bytes

    @app.exception_handler(TeacherError)
    async def _teacher_error(_: Request, error: TeacherError) -> JSONResponse:
        return error_response(error)

    @app.post("/v1/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        core.authorize(request.headers.get("authorization"))
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in MSGPACK_TYPES:
            raise InvalidRequest(
                f"content-type must be {MSGPACK_CONTENT_TYPE}, got {content_type or 'none'!r}"
            )
        fields = decode_msgpack(await read_body(request, limit))
        answer = core.infer(fields, path_model=name, timeout_s=_timeout_s(request))
        result = await _unless_disconnected(request, answer)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return Response(
            msgpack.packb(result_to_wire(result), use_bin_type=True),
            media_type=MSGPACK_CONTENT_TYPE,
        )

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        core.authorize(request.headers.get("authorization"))
        return core.describe()

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, Any]:
        core.authorize(request.headers.get("authorization"))
        return core.stats()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        core.authorize(request.headers.get("authorization"))
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        if not core.registry.ready:
            raise NotReady("models are still loading or the server is shutting down")
        return {"status": "ready"}

    return app
