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
FRAMED_TENSOR_FIELDS = frozenset({"dtype", "shape"})
FRAMED_CONTENT_TYPE = "application/vnd.kdserve.framed"
"""HTTP bodies framed for speed: a little-endian uint32 header length, the msgpack header
(the same fields, each tensor as dtype and shape only), then the tensors' raw bytes. The
server reads the images in place and answers in kind."""
FRAME_PREFIX_BYTES = 4
MIX_FIELDS = frozenset({"mode", "perm", "lam", "box"})
RESULT_TENSORS = ("logits", "top_k_values", "top_k_indices")
MODEL_INFO_FIELDS = tuple(field.name for field in dataclasses.fields(ModelInfo))
LIMIT_FIELDS = tuple(field.name for field in dataclasses.fields(ServerLimits))
T = TypeVar("T")

# ---- requests ---------------------------------------------------------------------------


def request_to_msgpack(request: InferRequest) -> bytes:
    """The HTTP body of a request."""
    packed: bytes = msgpack.packb(_request_map(request), use_bin_type=True)
    return packed


def _request_map(request: InferRequest) -> dict[str, Any]:
    """A request's msgpack fields (the images' data referenced, not copied)."""
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
    return fields


def request_from_msgpack(body: bytes, *, path_model: str | None = None) -> InferRequest:
    """A checked request from an HTTP body; `path_model` is the model named by the URL."""
    return _request_from_map(body, path_model, tensor_data=None)


def request_to_framed(request: InferRequest) -> list[bytes | memoryview]:
    """The framed HTTP body of a request, in pieces (the images' memory is referenced): a
    little-endian uint32 header length, the msgpack header, then the images' raw bytes."""
    header = _request_map(request)
    data = header["images"].pop("data")
    return _framed(header, [data])


def request_from_framed(body: bytes, *, path_model: str | None = None) -> InferRequest:
    """A checked request from a framed HTTP body; its images view the body's memory."""
    try:
        header, tail = _split_frame(body)
    except InvalidRequest as error:
        error.model = path_model
        raise
    return _request_from_map(header, path_model, tensor_data=tail)


def _request_from_map(
    packed: bytes | memoryview, path_model: str | None, tensor_data: memoryview | None
) -> InferRequest:
    """A request from its packed msgpack fields; `tensor_data`: the images' bytes follow them
    (a framed body) instead of being their `images.data` field."""
    model = path_model
    try:
        fields = _map(_unpack(packed), "request body" if tensor_data is None else "header")
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
        if tensor_data is None:
            images = checked_images(*_tensor_fields(fields["images"], "images"))
        else:
            images = checked_images(*_tensor_head(fields["images"], "images"), tensor_data)
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
    """A checked request from a serialized InferRequest message.

    The images' bytes are viewed in place, not copied out by the parser, when the message
    holds its images and their data once each (as every encoder writes it); any other
    message is parsed whole, with protobuf's own meaning of repeated fields.
    """
    split = _split_images(memoryview(body))
    data: bytes | memoryview
    if split is None:
        message = _parse(pb.InferRequest, body, InvalidRequest)
        tensor, data = message.images, message.images.data
        has_images = message.HasField("images")
    else:
        rest, head, data = split
        message = _parse(pb.InferRequest, rest, InvalidRequest)
        tensor, has_images = _parse(pb.Tensor, head, InvalidRequest), True
    model = message.model if message.HasField("model") else None
    try:
        if not has_images:
            raise missing("images")
        images = checked_images(tensor.dtype, tensor.shape, data)
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
    packed: bytes = msgpack.packb(_result_map(result), use_bin_type=True)
    return packed


def result_to_framed(result: InferResult) -> list[bytes | memoryview]:
    """The framed HTTP body of a result, in pieces: header length, msgpack header, then the
    raw bytes of its tensors in RESULT_TENSORS order (each header entry has dtype and shape)."""
    header = _result_map(result)
    data = [header[name].pop("data") for name in RESULT_TENSORS if name in header]
    return _framed(header, data)


def _result_map(result: InferResult) -> dict[str, Any]:
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
    return body


def result_from_msgpack(body: bytes) -> InferResult:
    """A result from an HTTP answer; a malformed answer is a TeacherError."""
    return _result_from_map(body, tensor_data=None)


def result_from_framed(body: bytes) -> InferResult:
    """A result from a framed HTTP answer; a malformed answer is a TeacherError."""
    try:
        header, tail = _split_frame(body)
    except InvalidRequest as error:
        raise TeacherError(f"malformed answer: {error.message}") from None
    return _result_from_map(header, tensor_data=tail)


def _result_from_map(packed: bytes | memoryview, tensor_data: memoryview | None) -> InferResult:
    try:
        fields = _map(_unpack(packed), "answer")
        timings = _map(fields.get("timings") or {}, "timings")
        tensors = {}
        offset = 0
        for name in RESULT_TENSORS:
            if fields.get(name) is None:
                continue
            if tensor_data is None:
                tensors[name] = _answer_tensor(name, *_tensor_fields(fields[name], name))
                continue
            dtype, shape = _tensor_head(fields[name], name)
            size = _byte_count(name, dtype, shape)
            data = tensor_data[offset : offset + size]
            tensors[name] = _answer_tensor(name, dtype, shape, data)
            offset += size
        if tensor_data is not None and offset != len(tensor_data):
            raise InvalidRequest(
                f"{len(tensor_data)} tensor bytes follow the header, its tensors take {offset}"
            )
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


def _tensor_head(value: Any, field: str) -> tuple[str, list[int]]:
    """A framed header's tensor map: (dtype, shape); its bytes follow the header."""
    tensor = _map(value, field, "a map with dtype and shape")
    _known_fields(tensor, FRAMED_TENSOR_FIELDS, field)
    return (
        _typed(tensor, "dtype", str, "a string", where=field) or "",
        _integers(tensor, "shape", where=field),
    )


def _byte_count(field: str, dtype: str, shape: Sequence[int]) -> int:
    if (
        dtype not in contract.TENSOR_DTYPES
        or len(shape) > contract.MAX_DIMS
        or not all(0 <= d <= contract.MAX_DIM for d in shape)
    ):
        raise InvalidRequest(f"{field} has dtype {dtype!r} and shape {contract.preview(shape)}")
    return contract.byte_count(contract.TENSOR_DTYPES[dtype], shape)


def _framed(header: dict[str, Any], data: list[memoryview]) -> list[bytes | memoryview]:
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    return [len(packed).to_bytes(FRAME_PREFIX_BYTES, "little"), packed, *data]


def _split_frame(body: bytes | memoryview) -> tuple[memoryview, memoryview]:
    """A framed body's (msgpack header, the tensor bytes after it), both views of `body`."""
    view = memoryview(body)
    if len(view) < FRAME_PREFIX_BYTES:
        raise InvalidRequest(
            f"a framed body starts with a {FRAME_PREFIX_BYTES}-byte header length; "
            f"got {len(view)} bytes"
        )
    length = int.from_bytes(view[:FRAME_PREFIX_BYTES], "little")
    end = FRAME_PREFIX_BYTES + length
    if end > len(view):
        raise InvalidRequest(f"header length {length} runs past the body's {len(view)} bytes")
    return view[FRAME_PREFIX_BYTES:end], view[end:]


def _tensor_field(number: int, tensor: torch.Tensor) -> list[bytes | memoryview]:
    """Field `number` holding `tensor` as a Tensor message; its data is referenced, not copied."""
    data = contract.tensor_bytes(tensor)
    head = pb.Tensor(dtype=contract.dtype_name(tensor), shape=tensor.shape).SerializeToString()
    data_key = _key(pb.Tensor.DATA_FIELD_NUMBER) + _varint(len(data))
    return [_key(number), _varint(len(head) + len(data_key) + len(data)), head, data_key, data]


def _answer_tensor(
    name: str, dtype: str, shape: Sequence[int], data: bytes | memoryview
) -> torch.Tensor:
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


def _unpack(body: bytes | memoryview) -> Any:
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

M = TypeVar("M", pb.InferRequest, pb.InferResponse, pb.ListModelsResponse, pb.Tensor)


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


def _split_images(body: memoryview) -> tuple[bytes, bytes, memoryview] | None:
    """An InferRequest's (other fields, images without their data, the data in place), or
    None where the images or their data are absent or repeated, or the message is malformed."""
    images = _take_field(body, pb.InferRequest.IMAGES_FIELD_NUMBER)
    if images is None:
        return None
    rest, tensor = images
    data = _take_field(tensor, pb.Tensor.DATA_FIELD_NUMBER)
    if data is None:
        return None
    head, data_view = data
    return rest, head, data_view


MAX_SCANNED_FIELDS = 32
"""More fields than this (a message padded with many unknown ones) go to protobuf's own
parse, whose time per byte is far below this Python loop's."""
MAX_KEY_BYTES = 5
"""protobuf refuses a longer field key; so does the scan, by leaving it to the parse."""


def _take_field(message: memoryview, number: int) -> tuple[bytes, memoryview] | None:
    """(the message without field `number`, that field's value in place) when the field is
    length-delimited and appears once; None otherwise or when the message is malformed."""
    found = None
    position = fields = 0
    while position < len(message):
        fields += 1
        if fields > MAX_SCANNED_FIELDS:
            return None
        start = position
        key, position = _read_varint(message, position)
        if position - start > MAX_KEY_BYTES:
            return None
        wire_type = key & 7
        value_start = position
        if wire_type == 0:
            _, position = _read_varint(message, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, value_start = _read_varint(message, position)
            position = value_start + length
        else:
            return None
        if position > len(message) or key < 8:
            return None
        if key >> 3 == number:
            if found is not None or wire_type != 2:
                return None
            found = (start, value_start, position)
    if found is None:
        return None
    start, value_start, end = found
    return bytes(message[:start]) + bytes(message[end:]), message[value_start:end]


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    """The varint at `position` and the position after it; one running past the buffer
    (or over 10 bytes) ends past it, which the caller reads as malformed."""
    value = shift = 0
    for index in range(position, min(position + 10, len(buffer))):
        byte = buffer[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return 0, len(buffer) + 1
