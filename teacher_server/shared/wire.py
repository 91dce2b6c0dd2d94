"""The contract's two encodings, in both directions: msgpack maps (HTTP) and protobuf (gRPC).

Decoding reads a format's fields, checks their types (msgpack is untyped) and builds the
contract's values through its `checked_*` constructors, in the same order for both formats,
with proto3's meaning of absence for both: a missing string is "", a missing list is [], an
optional scalar is None. So one bad request gets one InvalidRequest message on either wire.
Encoding writes a tensor's bytes once, into the message itself: a tensor field's data is
referenced, never copied into an intermediate object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgpack
import torch
from google.protobuf.message import DecodeError

from teacher_server.shared import contract
from teacher_server.shared._proto import teacher_pb2 as pb
from teacher_server.shared.contract import (
    InferRequest,
    InferResult,
    Mix,
    ModelInfo,
    ModelList,
    ServerLimits,
    Timings,
    checked_images,
    checked_mix,
    checked_request,
    checked_tensor,
    missing,
)
from teacher_server.shared.errors import InvalidRequest, TeacherError

MSGPACK_CONTENT_TYPE = "application/msgpack"
TIMEOUT_HEADER = "x-request-timeout-ms"
"""HTTP: how long the client waits for this answer; gRPC uses the call's own deadline."""
RETRY_AFTER_KEY = "retry-after-ms"
"""HTTP header and gRPC trailing metadata: the back-off hint of a refused request."""
ERROR_NAME_KEY = "kdserve-error"
"""gRPC trailing metadata: the error table's name of the error (HTTP carries it in the body)."""
GRPC_SERVICE = "kdserve.v1.Teacher"
"""Our gRPC service, also the name its health is reported under (the client's health checks)."""


def retry_after_ms(seconds: float) -> str:
    """A back-off hint as its header or metadata value: whole milliseconds, rounded up."""
    return str(math.ceil(seconds * 1000))


REQUEST_FIELDS = frozenset(
    {
        "model",
        "images",
        "mix",
        "temperature",
        "output",
        "output_dtype",
        "top_k",
        "request_id",
        "client_id",
    }
)
TENSOR_FIELDS = frozenset({"dtype", "shape", "data"})
MIX_FIELDS = frozenset({"mode", "perm", "lam", "box"})
RESULT_TENSORS = ("logits", "top_k_values", "top_k_indices")
MODEL_INFO_FIELDS = tuple(field.name for field in dataclasses.fields(ModelInfo))
LIMIT_FIELDS = tuple(field.name for field in dataclasses.fields(ServerLimits))
T = TypeVar("T")

# ---- requests ---------------------------------------------------------------------------


def request_to_msgpack(request: InferRequest) -> bytes:
    """The HTTP body of a request."""
    fields: dict[str, Any] = {
        "model": request.model,
        "images": _tensor_map(request.images),
        "temperature": request.temperature,
        "output": request.output,
        "output_dtype": request.output_dtype,
        "request_id": request.request_id,
    }
    if request.top_k is not None:
        fields["top_k"] = request.top_k
    if request.mix is not None:
        fields["mix"] = _mix_map(request.mix)
    if request.client_id:
        fields["client_id"] = request.client_id
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def request_from_msgpack(body: bytes, *, path_model: str | None = None) -> InferRequest:
    """A checked request from an HTTP body; `path_model` is the model named by the URL."""
    model = path_model
    try:
        fields = _map(_unpack(body), "request body")
        _known_fields(fields, REQUEST_FIELDS, "request")
        named = _typed(fields, "model", str, "a string")
        if named and path_model is not None and named != path_model:
            raise InvalidRequest(
                f"body model {named!r} differs from the URL's model {path_model!r}"
            )
        if named is not None:
            model = named
        if fields.get("images") is None:
            raise missing("images")
        images = checked_images(*_tensor_fields(fields["images"], "images"))
        mix_fields = fields.get("mix")
        return checked_request(
            model=model,
            images=images,
            mix=None if mix_fields is None else _mix_from_map(mix_fields, images),
            temperature=_number(fields, "temperature"),
            output=_typed(fields, "output", str, "a string"),
            output_dtype=_typed(fields, "output_dtype", str, "a string"),
            top_k=_integer(fields, "top_k"),
            request_id=_typed(fields, "request_id", str, "a string"),
            client_id=_typed(fields, "client_id", str, "a string"),
        )
    except InvalidRequest as error:
        error.model = model or path_model
        raise


def request_to_protobuf(request: InferRequest) -> bytes:
    """A serialized InferRequest message."""
    message = pb.InferRequest(
        model=request.model,
        temperature=request.temperature,
        output=request.output,
        output_dtype=request.output_dtype,
        request_id=request.request_id,
        client_id=request.client_id,
    )
    if request.top_k is not None:
        message.top_k = request.top_k
    if request.mix is not None:
        message.mix.CopyFrom(_mix_message(request.mix))
    images = _tensor_field(pb.InferRequest.IMAGES_FIELD_NUMBER, request.images)
    return b"".join([message.SerializeToString(), *images])


def request_from_protobuf(body: bytes) -> InferRequest:
    """A checked request from a serialized InferRequest message."""
    message = _parse(pb.InferRequest, body, InvalidRequest)
    model = message.model if message.HasField("model") else None
    try:
        if not message.HasField("images"):
            raise missing("images")
        tensor = message.images
        images = checked_images(tensor.dtype, tensor.shape, tensor.data)
        mix = None
        if message.HasField("mix"):
            lam = message.mix.lam if message.mix.HasField("lam") else None
            mix = checked_mix(message.mix.mode, message.mix.perm, lam, message.mix.box, images)
        return checked_request(
            model=model,
            images=images,
            mix=mix,
            temperature=message.temperature if message.HasField("temperature") else None,
            output=message.output if message.HasField("output") else None,
            output_dtype=message.output_dtype if message.HasField("output_dtype") else None,
            top_k=message.top_k if message.HasField("top_k") else None,
            request_id=message.request_id,
            client_id=message.client_id,
        )
    except InvalidRequest as error:
        error.model = model or None
        raise


# ---- results ----------------------------------------------------------------------------


def result_to_msgpack(result: InferResult) -> bytes:
    """The HTTP body of a result; tensors that were not asked for are left out."""
    body: dict[str, Any] = {
        "model": result.model,
        "request_id": result.request_id,
        "timings": {
            "queue_ms": result.timings.queue_ms,
            "compute_ms": result.timings.compute_ms,
            "total_ms": result.timings.total_ms,
            "batch_sizes": list(result.timings.batch_sizes),
        },
    }
    if result.members:
        body["members"] = list(result.members)
    for name in RESULT_TENSORS:
        tensor = getattr(result, name)
        if tensor is not None:
            body[name] = _tensor_map(tensor)
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def result_from_msgpack(body: bytes) -> InferResult:
    """A result from an HTTP answer; a malformed answer is a TeacherError."""
    try:
        fields = _map(_unpack(body), "answer")
        timings = _map(fields.get("timings") or {}, "timings")
        tensors = {
            name: _answer_tensor(name, *_tensor_fields(fields[name], name))
            for name in RESULT_TENSORS
            if fields.get(name) is not None
        }
        return InferResult(
            model=_typed(fields, "model", str, "a string") or "",
            request_id=_typed(fields, "request_id", str, "a string") or "",
            timings=Timings(
                queue_ms=_number(timings, "queue_ms") or 0.0,
                compute_ms=_number(timings, "compute_ms") or 0.0,
                total_ms=_number(timings, "total_ms") or 0.0,
                batch_sizes=tuple(_integers(timings, "batch_sizes")),
            ),
            members=tuple(_strings(fields, "members")),
            **tensors,
        )
    except InvalidRequest as error:
        raise TeacherError(f"malformed answer: {error.message}") from None


def result_to_protobuf(result: InferResult) -> bytes:
    """A serialized InferResponse message; each tensor's bytes are written once, into it."""
    message = pb.InferResponse(
        model=result.model,
        request_id=result.request_id,
        timings=pb.Timings(
            queue_ms=result.timings.queue_ms,
            compute_ms=result.timings.compute_ms,
            total_ms=result.timings.total_ms,
            batch_sizes=result.timings.batch_sizes,
        ),
        members=result.members,
    )
    pieces: list[bytes | memoryview] = [message.SerializeToString()]
    for name in RESULT_TENSORS:
        tensor = getattr(result, name)
        if tensor is not None:
            pieces += _tensor_field(pb.InferResponse.DESCRIPTOR.fields_by_name[name].number, tensor)
    return b"".join(pieces)


def result_from_protobuf(body: bytes) -> InferResult:
    """A result from a serialized InferResponse; a malformed answer is a TeacherError."""
    message = _parse(pb.InferResponse, body, TeacherError)
    tensors = {}
    try:
        for name in RESULT_TENSORS:
            if message.HasField(name):
                field = getattr(message, name)
                tensors[name] = _answer_tensor(name, field.dtype, field.shape, field.data)
    except InvalidRequest as error:
        raise TeacherError(f"malformed answer: {error.message}") from None
    return InferResult(
        model=message.model,
        request_id=message.request_id,
        timings=Timings(
            queue_ms=message.timings.queue_ms,
            compute_ms=message.timings.compute_ms,
            total_ms=message.timings.total_ms,
            batch_sizes=tuple(message.timings.batch_sizes),
        ),
        members=tuple(message.members),
        **tensors,
    )


# ---- model lists ------------------------------------------------------------------------


def models_to_map(models: ModelList) -> dict[str, Any]:
    """The JSON body of `GET /v1/models`."""
    return dataclasses.asdict(models)


def models_from_map(body: Any) -> ModelList:
    """The model list from a `GET /v1/models` JSON body; a malformed one is a TeacherError."""
    try:
        limits = body["limits"]
        return ModelList(
            models=tuple(
                _model_info(**{field: m[field] for field in MODEL_INFO_FIELDS if field in m})
                for m in body["models"]
            ),
            limits=ServerLimits(
                **{field: int(limits[field]) for field in LIMIT_FIELDS if field in limits}
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TeacherError(f"malformed model list: {type(exc).__name__}: {exc}") from None


def models_to_protobuf(models: ModelList) -> bytes:
    """A serialized ListModelsResponse message."""
    message = pb.ListModelsResponse(
        models=[pb.ModelInfo(**dataclasses.asdict(m)) for m in models.models],
        limits=pb.ServerLimits(**dataclasses.asdict(models.limits)),
    )
    return message.SerializeToString()


def models_from_protobuf(body: bytes) -> ModelList:
    """The model list from a serialized ListModelsResponse message."""
    message = _parse(pb.ListModelsResponse, body, TeacherError)
    return ModelList(
        models=tuple(
            _model_info(**{field: getattr(m, field) for field in MODEL_INFO_FIELDS})
            for m in message.models
        ),
        limits=ServerLimits(**{field: getattr(message.limits, field) for field in LIMIT_FIELDS}),
    )


def _model_info(
    *,
    name: str,
    kind: str,
    num_classes: int,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    dtype: str,
    members: Sequence[str],
    combine: str,
    member_weights: Sequence[float],
    max_images: int = 0,
) -> ModelInfo:
    """A ModelInfo from decoded fields; `max_images` is absent in answers of older servers."""
    height, width = (int(side) for side in input_size)
    return ModelInfo(
        name=str(name),
        kind=str(kind),
        num_classes=int(num_classes),
        input_size=(height, width),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        dtype=str(dtype),
        members=tuple(str(v) for v in members),
        combine=str(combine),
        member_weights=tuple(float(v) for v in member_weights),
        max_images=int(max_images),
    )


# ---- tensors and mixes ------------------------------------------------------------------


def _tensor_map(tensor: torch.Tensor) -> dict[str, Any]:
    return {
        "dtype": contract.dtype_name(tensor),
        "shape": list(tensor.shape),
        "data": contract.tensor_bytes(tensor),
    }


def _tensor_fields(value: Any, field: str) -> tuple[str, list[int], bytes]:
    """A msgpack tensor map's (dtype, shape, data), each of the right type or absent."""
    tensor = _map(value, field, "a map with dtype, shape, data")
    _known_fields(tensor, TENSOR_FIELDS, field)
    data = _typed(tensor, "data", bytes, "bytes", where=field)
    return (
        _typed(tensor, "dtype", str, "a string", where=field) or "",
        _integers(tensor, "shape", where=field),
        b"" if data is None else data,
    )


def _tensor_field(number: int, tensor: torch.Tensor) -> list[bytes | memoryview]:
    """Field `number` holding `tensor` as a Tensor message; its data is referenced, not copied."""
    data = contract.tensor_bytes(tensor)
    head = pb.Tensor(dtype=contract.dtype_name(tensor), shape=tensor.shape).SerializeToString()
    data_key = _key(pb.Tensor.DATA_FIELD_NUMBER) + _varint(len(data))
    return [_key(number), _varint(len(head) + len(data_key) + len(data)), head, data_key, data]


def _answer_tensor(name: str, dtype: str, shape: Sequence[int], data: bytes) -> torch.Tensor:
    """A result tensor that owns its memory (the answer's bytes are not kept alive)."""
    return checked_tensor(name, dtype, shape, data).clone()


def _mix_map(mix: Mix) -> dict[str, Any]:
    fields: dict[str, Any] = {"mode": mix.mode, "perm": list(mix.perm)}
    if mix.mode == "mixup":
        fields["lam"] = mix.lam
    elif mix.box is not None:
        fields["box"] = list(mix.box)
    return fields


def _mix_from_map(value: Any, images: torch.Tensor) -> Mix:
    fields = _map(value, "mix", "a map with mode, perm, lam or box")
    _known_fields(fields, MIX_FIELDS, "mix")
    return checked_mix(
        _typed(fields, "mode", str, "a string", where="mix") or "",
        _integers(fields, "perm", where="mix"),
        _number(fields, "lam", where="mix"),
        _integers(fields, "box", where="mix"),
        images,
    )


def _mix_message(mix: Mix) -> pb.Mix:
    message = pb.Mix(mode=mix.mode, perm=mix.perm)
    if mix.mode == "mixup":
        message.lam = mix.lam
    elif mix.box is not None:
        message.box.extend(mix.box)
    return message


# ---- msgpack fields: types checked, absence as proto3 has it ----------------------------


def _unpack(body: bytes) -> Any:
    """msgpack bytes -> Python values; extension types are never turned into objects."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise InvalidRequest(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from None


def _map(value: Any, field: str, what: str = "a map") -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{field} must be {what}, got {_kind(value)}")
    return value


def _known_fields(fields: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = set(fields) - known
    if unknown:
        raise InvalidRequest(
            f"{where} has unknown fields {sorted(map(str, unknown))}; known: {sorted(known)}"
        )


def _typed(
    fields: Mapping[str, Any], name: str, kind: type[T], what: str, *, where: str = ""
) -> T | None:
    """The field's value if it has type `kind` (bytes: any bytes-like), None if absent or nil."""
    value = fields.get(name)
    if value is None:
        return None
    if kind is bytes and isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if not isinstance(value, kind):
        raise InvalidRequest(f"{_name(where, name)} must be {what}, got {_kind(value)}")
    return value


def _number(fields: Mapping[str, Any], name: str, *, where: str = "") -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{_name(where, name)} must be a number, got {_kind(value)}")
    return float(value)


def _integer(fields: Mapping[str, Any], name: str, *, where: str = "") -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{_name(where, name)} must be an int, got {_kind(value)}")
    return value


def _integers(fields: Mapping[str, Any], name: str, *, where: str = "") -> list[int]:
    value = fields.get(name)
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise InvalidRequest(
            f"{_name(where, name)} must be a list of ints, got {contract.preview(value)}"
        )
    return list(value)


def _strings(fields: Mapping[str, Any], name: str) -> list[str]:
    value = fields.get(name)
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{name} must be a list of strings, got {contract.preview(value)}")
    return list(value)


def _name(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _kind(value: Any) -> str:
    return type(value).__name__


# ---- protobuf framing -------------------------------------------------------------------

M = TypeVar("M", pb.InferRequest, pb.InferResponse, pb.ListModelsResponse)


def _parse(message_type: type[M], body: bytes, error: type[TeacherError]) -> M:
    try:
        return message_type.FromString(body)
    except DecodeError as exc:
        raise error(f"body is not a valid {message_type.__name__} message ({exc})") from None


def _key(field_number: int) -> bytes:
    """The key of a length-delimited field (wire type 2)."""
    return _varint(field_number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
