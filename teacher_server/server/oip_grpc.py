"""The Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`) beside ours.

Like `kdserve.v1.Teacher`, its methods take and return raw message bytes, parsed by
`shared.oip` with the v2 messages of our own descriptor pool, so an undecodable message is
INVALID_ARGUMENT and every error carries the error table's status. ServerLive and
ServerReady need no token; the other methods do, when the server has one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from teacher_server.server.grpc_api import abort, authorization
from teacher_server.server.lifecycle import Lifecycle
from teacher_server.shared import oip
from teacher_server.shared._proto import grpc_predict_v2_pb2 as v2
from teacher_server.shared.errors import InvalidRequest, TeacherError

if TYPE_CHECKING:
    from teacher_server.server.grpc_api import Context

M = TypeVar("M", bound=Message)


class InferenceService:
    """The v2 methods over one lifecycle."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    async def server_live(self, body: bytes) -> Message:
        _parse(v2.ServerLiveRequest, body)
        return v2.ServerLiveResponse(live=True)

    async def server_ready(self, body: bytes) -> Message:
        _parse(v2.ServerReadyRequest, body)
        return v2.ServerReadyResponse(ready=self.lifecycle.ready)

    async def server_metadata(self, body: bytes) -> Message:
        _parse(v2.ServerMetadataRequest, body)
        return v2.ServerMetadataResponse(**oip.server_metadata())

    async def model_ready(self, body: bytes) -> Message:
        request = _parse(v2.ModelReadyRequest, body)
        oip.find_model(self.lifecycle.describe().models, request.name, request.version)
        return v2.ModelReadyResponse(ready=self.lifecycle.ready)

    async def model_metadata(self, body: bytes) -> Message:
        request = _parse(v2.ModelMetadataRequest, body)
        info = oip.find_model(self.lifecycle.describe().models, request.name, request.version)
        return v2.ModelMetadataResponse.FromString(oip.model_metadata_to_grpc(info))

    async def model_infer(self, body: bytes, timeout_s: float | None, peer: str) -> bytes:
        self.lifecycle.check_size(len(body))
        decoded = self.lifecycle.decoded(partial(oip.request_from_grpc, body))
        if decoded.timeout_s is not None:
            timeout_s = min(decoded.timeout_s, timeout_s or decoded.timeout_s)
        result = await self.lifecycle.infer(lambda: decoded.request, timeout_s=timeout_s, peer=peer)
        return oip.result_to_grpc(result, decoded)


def oip_methods(lifecycle: Lifecycle) -> grpc.GenericRpcHandler[bytes, bytes]:
    """The v2 service's method handlers, for `server.add_generic_rpc_handlers`."""
    service = InferenceService(lifecycle)

    def unary(
        method: Callable[[bytes], Awaitable[Message]], *, needs_token: bool = True
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        async def handle(body: bytes, context: Context) -> bytes:
            try:
                if needs_token:
                    lifecycle.authorize(authorization(context))
                answer = await method(body)
            except TeacherError as error:
                await abort(context, error)
                raise AssertionError("unreachable: abort raises") from error
            return answer.SerializeToString()

        return grpc.unary_unary_rpc_method_handler(handle)

    async def infer(body: bytes, context: Context) -> bytes:
        try:
            lifecycle.authorize(authorization(context))
            return await service.model_infer(body, context.time_remaining(), context.peer())
        except TeacherError as error:
            await abort(context, error)
            raise AssertionError("unreachable: abort raises") from error

    methods = {
        "ServerLive": unary(service.server_live, needs_token=False),
        "ServerReady": unary(service.server_ready, needs_token=False),
        "ServerMetadata": unary(service.server_metadata),
        "ModelReady": unary(service.model_ready),
        "ModelMetadata": unary(service.model_metadata),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
    }
    return grpc.method_handlers_generic_handler(oip.GRPC_SERVICE, methods)


def _parse(message_type: type[M], body: bytes) -> M:
    try:
        return message_type.FromString(body)
    except (DecodeError, ValueError) as exc:
        raise InvalidRequest(f"{message_type.__name__} does not parse: {exc}") from None
