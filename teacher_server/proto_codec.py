"""Protobuf messages <-> the plain field maps of the wire contract, in both directions.

The HTTP transport carries these maps as msgpack; gRPC carries them as protobuf. Converting
here, and nowhere else, keeps the two transports symmetric (unset protobuf fields -> absent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from teacher_server._proto import teacher_pb2

_TENSORS = ("logits", "top_k_values", "top_k_indices")
_OPTIONAL_SCALARS = ("temperature", "output", "output_dtype", "top_k", "request_id")


def tensor_fields(message: teacher_pb2.Tensor) -> dict[str, Any]:
    return {"dtype": message.dtype, "shape": list(message.shape), "data": message.data}


def request_fields(message: teacher_pb2.InferRequest) -> dict[str, Any]:
    """InferRequest -> request map (the server validates it with codec.parse_request)."""
    fields: dict[str, Any] = {"model": message.model or None}
    if message.HasField("images"):
        fields["images"] = tensor_fields(message.images)
    if message.HasField("mix"):
        mix: dict[str, Any] = {"mode": message.mix.mode, "perm": list(message.mix.perm)}
        if message.mix.mode == "mixup":
            mix["lam"] = message.mix.lam if message.mix.HasField("lam") else None
        else:
            mix["box"] = list(message.mix.box)
        fields["mix"] = mix
    for name in _OPTIONAL_SCALARS:
        if name in ("temperature", "top_k"):
            if message.HasField(name):
                fields[name] = getattr(message, name)
        elif getattr(message, name):
            fields[name] = getattr(message, name)
    return fields


def request_message(fields: Mapping[str, Any]) -> teacher_pb2.InferRequest:
    """Request map -> InferRequest (the client's side)."""
    message = teacher_pb2.InferRequest(
        model=fields["model"], images=teacher_pb2.Tensor(**fields["images"])
    )
    if fields.get("mix") is not None:
        message.mix.CopyFrom(teacher_pb2.Mix(**fields["mix"]))
    for name in _OPTIONAL_SCALARS:
        if fields.get(name) is not None:
            setattr(message, name, fields[name])
    return message


def response_message(body: Mapping[str, Any]) -> teacher_pb2.InferResponse:
    """Response map (codec.result_to_wire) -> InferResponse."""
    message = teacher_pb2.InferResponse(
        model=body["model"],
        request_id=body["request_id"],
        timings=teacher_pb2.Timings(**body["timings"]),
    )
    for name in _TENSORS:
        if name in body:
            getattr(message, name).CopyFrom(teacher_pb2.Tensor(**body[name]))
    return message


def response_fields(message: teacher_pb2.InferResponse) -> dict[str, Any]:
    """InferResponse -> the same map an HTTP response body decodes to."""
    body: dict[str, Any] = {
        "model": message.model,
        "request_id": message.request_id,
        "timings": {
            "queue_ms": message.timings.queue_ms,
            "compute_ms": message.timings.compute_ms,
            "total_ms": message.timings.total_ms,
            "batch_sizes": list(message.timings.batch_sizes),
        },
    }
    for name in _TENSORS:
        if message.HasField(name):
            body[name] = tensor_fields(getattr(message, name))
    return body


def describe_message(described: Mapping[str, Any]) -> teacher_pb2.ListModelsResponse:
    """Model list + limits map (core.describe) -> ListModelsResponse."""
    return teacher_pb2.ListModelsResponse(
        models=[teacher_pb2.ModelInfo(**info) for info in described["models"]],
        limits=teacher_pb2.ServerLimits(**described["limits"]),
    )


def describe_fields(message: teacher_pb2.ListModelsResponse) -> dict[str, Any]:
    """ListModelsResponse -> the same map `GET /v1/models` answers."""
    info_fields = [f.name for f in teacher_pb2.ModelInfo.DESCRIPTOR.fields]
    limit_fields = [f.name for f in teacher_pb2.ServerLimits.DESCRIPTOR.fields]
    return {
        "models": [
            {name: _plain(getattr(model, name)) for name in info_fields} for model in message.models
        ],
        "limits": {name: getattr(message.limits, name) for name in limit_fields},
    }


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float) else list(value)
