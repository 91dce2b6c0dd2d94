"""gRPC front end (grpcio aio): protobuf <-> the codec's fields, call the core, map errors.

`InferStream` keeps one stream per student: each request is answered as soon as it is done
(possibly out of order, matched by request_id); a bad request gets an `error` message on
the stream, which stays open.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from teacher_server._proto import teacher_pb2, teacher_pb2_grpc
from teacher_server.codec import RETRY_AFTER_METADATA, InferResult, result_to_wire
from teacher_server.core import TeacherCore
from teacher_server.errors import TeacherError
from teacher_server.proto_codec import describe_message, request_fields, response_message

SERVICE_NAME = "kdserve.v1.Teacher"
HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]


def _result_message(result: InferResult) -> teacher_pb2.InferResponse:
    return response_message(result_to_wire(result))


def error_message(error: TeacherError, request_id: str) -> teacher_pb2.InferResponse:
    return teacher_pb2.InferResponse(
        request_id=request_id,
        error=teacher_pb2.Error(
            code=error.code_name,
            http_status=error.http_status,
            message=error.message,
            retry_after_s=error.retry_after_s or 0.0,
        ),
    )


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: TeacherError) -> None:
    """The one mapping from a TeacherError to a gRPC status and retry hint."""
    trailing: tuple[tuple[str, str], ...] = ()
    if error.retry_after_s is not None:
        trailing = ((RETRY_AFTER_METADATA, str(math.ceil(error.retry_after_s * 1000))),)
    await context.abort(error.grpc_code, error.message, trailing_metadata=trailing)


def _timeout_s(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """Seconds left before the call's deadline (None when the client set none)."""
    remaining: float | None = context.time_remaining()
    return remaining


def _authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class TeacherService(teacher_pb2_grpc.TeacherServicer):
    """The Teacher gRPC service over one TeacherCore."""

    def __init__(self, core: TeacherCore) -> None:
        self.core = core

    async def Infer(
        self, request: teacher_pb2.InferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> teacher_pb2.InferResponse:
        try:
            self.core.authorize(_authorization(context))
            result = await self.core.infer(request_fields(request), timeout_s=_timeout_s(context))
        except TeacherError as error:
            await abort(context, error)
            raise AssertionError("unreachable: abort raises") from error
        return _result_message(result)

    async def InferStream(
        self,
        request_iterator: AsyncIterator[teacher_pb2.InferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[teacher_pb2.InferResponse]:
        try:
            self.core.authorize(_authorization(context))
        except TeacherError as error:
            await abort(context, error)
        answers: asyncio.Queue[teacher_pb2.InferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(message: teacher_pb2.InferRequest) -> None:
            try:
                result = await self.core.infer(
                    request_fields(message), timeout_s=_timeout_s(context)
                )
                await answers.put(_result_message(result))
            except TeacherError as error:
                await answers.put(error_message(error, message.request_id))

        async def read() -> None:
            async for message in request_iterator:
                task = asyncio.create_task(answer(message))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(set(pending))

        reader = asyncio.create_task(read())
        # The sentinel also comes when reading fails, so the loop below never waits forever.
        reader.add_done_callback(lambda _: answers.put_nowait(None))
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def ListModels(
        self, request: teacher_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> teacher_pb2.ListModelsResponse:
        try:
            self.core.authorize(_authorization(context))
        except TeacherError as error:
            await abort(context, error)
        return describe_message(self.core.describe())


def create_grpc_server(core: TeacherCore) -> tuple[grpc.aio.Server, Any]:
    """An aio server with the Teacher and standard health services (not started, no ports)."""
    limit = core.config.server.max_request_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
        ]
    )
    teacher_pb2_grpc.add_TeacherServicer_to_server(TeacherService(core), server)  # type: ignore[no-untyped-call]
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


async def set_serving(health_servicer: Any, serving: bool) -> None:
    """Mark the overall server and the Teacher service SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)
