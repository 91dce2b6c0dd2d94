"""gRPC transport (grpcio aio): raw message bytes in, decode (`wire`), call the lifecycle, encode.

The Teacher service's methods take and return bytes, so the size limit, the parse and every
error go through the same code as over HTTP: an undecodable message is INVALID_ARGUMENT like
a bad msgpack body, and an oversized one is our RequestTooLarge. Errors carry the error
table's status and, as trailing metadata, the error's name and the retry hint.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from teacher_server.server.lifecycle import Lifecycle
from teacher_server.shared import oip, wire
from teacher_server.shared.errors import TeacherError, status_of

GRPC_READ_FACTOR = 2
"""grpcio reads messages up to this many times max_request_bytes, so that our own limit
answers the ones in between; a larger message is refused by grpcio itself (RESOURCE_EXHAUSTED
without our error name, which the client reads as the same RequestTooLarge)."""
HEALTH_SERVICES = ("", wire.GRPC_SERVICE, oip.GRPC_SERVICE)
"""The gRPC health services it reports: the overall server, the Teacher, the v2 inference."""
HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]
if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[bytes, bytes]


async def abort(context: Context, error: TeacherError) -> None:
    """The one mapping from a TeacherError to a gRPC status, error name and retry hint."""
    status = status_of(error)
    trailing: list[tuple[str, str]] = [(wire.ERROR_NAME_KEY, status.name)]
    if error.retry_after_s is not None:
        trailing.append((wire.RETRY_AFTER_KEY, wire.retry_after_ms(error.retry_after_s)))
    await context.abort(
        grpc.StatusCode[status.grpc], error.message, trailing_metadata=tuple(trailing)
    )


def authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class TeacherService:
    """The kdserve.v1.Teacher methods over one lifecycle."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    async def infer(self, body: bytes, context: Context) -> bytes:
        try:
            self.lifecycle.authorize(authorization(context))
            self.lifecycle.check_size(len(body))
            decode = partial(wire.request_from_protobuf, body)
            result = await self.lifecycle.infer(
                decode, timeout_s=context.time_remaining(), peer=context.peer()
            )
        except TeacherError as error:
            await abort(context, error)
            raise AssertionError("unreachable: abort raises") from error
        return wire.result_to_protobuf(result)

    async def list_models(self, body: bytes, context: Context) -> bytes:
        try:
            self.lifecycle.authorize(authorization(context))
        except TeacherError as error:
            await abort(context, error)
            raise AssertionError("unreachable: abort raises") from error
        return wire.models_to_protobuf(self.lifecycle.describe())


def create_grpc_server(lifecycle: Lifecycle) -> tuple[grpc.aio.Server, Any]:
    """An aio server with the Teacher and standard health services (not started, no ports)."""
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", GRPC_READ_FACTOR * lifecycle.max_request_bytes),
        ("grpc.max_send_message_length", -1),
    ]
    server_config = lifecycle.config.server
    if server_config.grpc_max_connection_age_s > 0:
        # grpcio adds +-10% jitter, so a client's connections do not all go at once; requests
        # on a closing connection have their whole timeout (and a second) to finish
        options += [
            (
                "grpc.max_connection_age_ms",
                max(1, round(server_config.grpc_max_connection_age_s * 1000)),
            ),
            (
                "grpc.max_connection_age_grace_ms",
                round(server_config.request_timeout_s * 1000) + 1000,
            ),
        ]
    server = grpc.aio.server(options=options)
    service = TeacherService(lifecycle)
    methods = {
        "Infer": grpc.unary_unary_rpc_method_handler(service.infer),
        "ListModels": grpc.unary_unary_rpc_method_handler(service.list_models),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(wire.GRPC_SERVICE, methods),)
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


async def set_serving(health_servicer: Any, serving: bool) -> None:
    """Mark the overall server, the Teacher and the v2 inference services SERVING or not."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, status)
