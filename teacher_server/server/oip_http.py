"""The Open Inference Protocol's REST endpoints (`/v2/...`) over the same lifecycle as `/v1`.

Health answers need no token; metadata and inference do, when the server has one. Errors
are the protocol's `{"error": message}` with the error table's HTTP status (and the same
retry hint headers as `/v1`); the codec is `shared.oip`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from teacher_server.server.http_api import (
    CLIENT_CLOSED_REQUEST,
    error_headers,
    peer_of,
    read_body,
    unless_disconnected,
)
from teacher_server.server.lifecycle import Lifecycle
from teacher_server.shared import oip
from teacher_server.shared.contract import ModelInfo
from teacher_server.shared.errors import NotReady, TeacherError, status_of


class OipRoute(APIRoute):
    """A route whose TeacherErrors answer in the protocol's error format, not `/v1`'s."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except TeacherError as error:
                return oip_error(error)

        return answer


def oip_error(error: TeacherError) -> JSONResponse:
    """A TeacherError as the protocol's error answer."""
    status = status_of(error)
    return JSONResponse(
        {"error": error.message}, status_code=status.http, headers=error_headers(error)
    )


def create_oip_router(lifecycle: Lifecycle) -> APIRouter:
    """The `/v2` routes of one teacher server."""
    router = APIRouter(route_class=OipRoute)

    def find(name: str, version: str = "") -> ModelInfo:
        return oip.find_model(lifecycle.describe().models, name, version)

    def authorize(request: Request) -> None:
        lifecycle.authorize(request.headers.get("authorization"))

    @router.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @router.get("/v2/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": lifecycle.ready}, status_code=200 if lifecycle.ready else 503)

    @router.get("/v2")
    async def server_metadata(request: Request) -> Response:
        authorize(request)
        return JSONResponse(oip.server_metadata())

    async def model_metadata(request: Request, name: str, version: str = "") -> Response:
        authorize(request)
        return JSONResponse(oip.model_metadata(find(name, version)))

    async def model_ready(request: Request, name: str, version: str = "") -> Response:
        authorize(request)
        find(name, version)
        if not lifecycle.ready:
            raise NotReady("models are still loading or the server is shutting down")
        return JSONResponse({"name": name, "ready": True})

    async def infer(request: Request, name: str, version: str = "") -> Response:
        authorize(request)
        if version:
            find(name, version)
        body = await read_body(request, lifecycle)
        header_length = request.headers.get(oip.HEADER_LENGTH)
        decoded = lifecycle.decoded(partial(oip.request_from_rest, body, header_length, name))
        answer = lifecycle.infer(
            lambda: decoded.request, timeout_s=decoded.timeout_s, peer=peer_of(request)
        )
        result = await unless_disconnected(request, answer)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        content, json_size = oip.result_to_rest(result, decoded)
        if json_size is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type="application/octet-stream",
            headers={oip.HEADER_LENGTH: str(json_size)},
        )

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"])
        router.add_api_route(f"{prefix}/ready", model_ready, methods=["GET"])
        router.add_api_route(f"{prefix}/infer", infer, methods=["POST"])
    return router
