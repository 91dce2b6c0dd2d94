"""The Open Inference Protocol (KServe v2) mapped onto the wire contract, REST and gRPC.

A v2 request names its model in the URL (REST) or `model_name` (gRPC) and carries the input
tensor `images` ([N, 3, H, W]; UINT8, FP16, BF16 or FP32), optionally the inputs `mix_perm`
([N], INT32 or INT64) and `mix_box` ([4], y0 x0 y1 x1), and request parameters
`temperature`, `output` (logits | probs | log_probs), `output_dtype` (FP32 | FP16),
`top_k`, `mix` (mixup | cutmix), `mix_lam`, and Triton's `timeout` (microseconds) and
`binary_data_output`. It answers the output `logits` ([N, num_classes]), or with `top_k` the
outputs `top_k_values` and `top_k_indices` (INT32); an ensemble's answer has the response
parameter `members` (the members combined, comma-separated). Every value goes through the contract's
`checked_*` constructors, so the v2 endpoints accept and refuse what our own protocol does.

REST bodies are JSON, or Triton's binary-tensor extension: the first
`Inference-Header-Content-Length` bytes are the JSON header, and each input whose
`parameters.binary_data_size` is set takes that many bytes of what follows, in order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf.message import DecodeError

from teacher_server import __version__
from teacher_server.shared._proto import grpc_predict_v2_pb2 as v2
from teacher_server.shared.contract import (
    InferRequest,
    InferResult,
    ModelInfo,
    checked_images,
    checked_mix,
    checked_request,
    missing,
    preview,
    tensor_bytes,
)
from teacher_server.shared.errors import InvalidRequest, ModelNotFound, RequestTooLarge

GRPC_SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "kdserve"
MODEL_VERSION = "1"
EXTENSIONS = ("binary_tensor_data", "parameters")
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGES, MIX_PERM, MIX_BOX = "images", "mix_perm", "mix_box"
LOGITS, TOP_K_VALUES, TOP_K_INDICES = "logits", "top_k_values", "top_k_indices"
MEMBERS = "members"
IMAGE_TYPES = {"UINT8": "uint8", "FP16": "float16", "BF16": "bfloat16", "FP32": "float32"}
INDEX_TYPES = {"INT32": torch.int32, "INT64": torch.int64}
OUTPUT_TYPES = {"float32": "FP32", "float16": "FP16", "int32": "INT32"}
OUTPUT_DTYPES = {"FP32": "float32", "FP16": "float16", "float32": "float32", "float16": "float16"}
PARAMETERS = frozenset(
    {
        "temperature",
        "output",
        "output_dtype",
        "top_k",
        "mix",
        "mix_lam",
        "timeout",
        "binary_data_output",
        "client_id",
    }
)
MAX_NESTING = 8
MAX_JSON_BYTES = 16 * 2**20
"""The JSON part of a REST request: parsed into Python objects (~10x its size in memory),
so it is bounded apart from max_request_bytes; binary tensors are the way for big batches."""
MAX_LISTED_VALUES = 2**22
"""Values one tensor may list as JSON `data` or gRPC typed `contents` (27 images of 224 px)."""
_ITEM_SIZE = {"UINT8": 1, "FP16": 2, "BF16": 2, "FP32": 4, "INT32": 4, "INT64": 8}


@dataclass(frozen=True)
class Tensor:
    """One input tensor as it arrived: raw bytes (binary or gRPC raw) or a list of numbers."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | None = None
    values: Sequence[Any] | None = None


@dataclass(frozen=True)
class V2Request:
    """A checked request, the outputs to answer (in order), and how (REST: binary or JSON)."""

    request: InferRequest
    outputs: tuple[str, ...]
    binary: frozenset[str]
    timeout_s: float | None
    request_id: str


# ---- requests -----------------------------------------------------------------------------


def request_from_rest(body: bytes, header_length: str | None, path_model: str) -> V2Request:
    """A checked request from a REST body (JSON, or JSON header + binary tensors)."""
    try:
        json_size = len(body) if header_length is None else _header_length(header_length, body)
        if json_size > MAX_JSON_BYTES:
            raise RequestTooLarge(
                f"the request's JSON is {json_size} bytes, over the {MAX_JSON_BYTES} a JSON "
                "part may have; send tensors as binary data (tritonclient's default)"
            )
        try:
            fields = json.loads(bytes(body[:json_size]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"request header is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequest("request header is JSON nested too deeply") from None
        fields = _object(fields, "request")
        _known(fields, {"id", "parameters", "inputs", "outputs"}, "request")
        blob = memoryview(body)[json_size:]
        inputs, offset = [], 0
        for index, item in enumerate(_list(fields.get("inputs"), "inputs")):
            where = f"inputs[{index}]"
            item = _object(item, where)
            _known(item, {"name", "shape", "datatype", "parameters", "data"}, where)
            name, datatype, shape = _tensor_head(item, where)
            params = _object(item.get("parameters", {}), f"{where}.parameters")
            _known(params, {"binary_data_size"}, f"{where}.parameters")
            size = params.get("binary_data_size")
            if size is not None:
                if not _is_int(size) or size < 0 or offset + size > len(blob):
                    raise InvalidRequest(
                        f"{where}.parameters.binary_data_size must be an int in "
                        f"[0, {len(blob) - offset}] (the binary bytes left), got {preview(size)}"
                    )
                if "data" in item:
                    raise InvalidRequest(f"{where} has both data and binary_data_size")
                inputs.append(Tensor(name, datatype, shape, data=blob[offset : offset + size]))
                offset += size
            else:
                if "data" not in item:
                    raise InvalidRequest(f"{where} needs data or parameters.binary_data_size")
                inputs.append(Tensor(name, datatype, shape, values=_list(item["data"], where)))
        if offset != len(blob):
            raise InvalidRequest(
                f"{len(blob) - offset} binary bytes after the header are not claimed by any "
                "input's binary_data_size"
            )
        parameters = dict(_object(fields.get("parameters", {}), "parameters"))
        outputs: list[tuple[str, bool | None]] = []
        for index, item in enumerate(_list(fields.get("outputs", []), "outputs")):
            where = f"outputs[{index}]"
            item = _object(item, where)
            _known(item, {"name", "parameters"}, where)
            params = _object(item.get("parameters", {}), f"{where}.parameters")
            _known(params, {"binary_data"}, f"{where}.parameters")
            binary = params.get("binary_data")
            if binary is not None and not isinstance(binary, bool):
                raise InvalidRequest(f"{where}.parameters.binary_data must be a bool")
            outputs.append((_string(item.get("name"), f"{where}.name"), binary))
        request_id = fields.get("id", "")
        if not isinstance(request_id, str):
            raise InvalidRequest(f"id must be a string, got {preview(request_id)}")
        return _checked(path_model, request_id, parameters, inputs, outputs)
    except InvalidRequest as error:
        error.model = path_model
        raise


def request_from_grpc(body: bytes) -> V2Request:
    """A checked request from a serialized ModelInferRequest."""
    try:
        message = v2.ModelInferRequest.FromString(body)
    except (DecodeError, ValueError) as exc:
        raise InvalidRequest(f"ModelInferRequest does not parse: {exc}") from None
    model = message.model_name
    try:
        _check_version(model, message.model_version)
        raw = list(message.raw_input_contents)
        if raw and len(raw) != len(message.inputs):
            raise InvalidRequest(
                f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs "
                "(all inputs raw, or none)"
            )
        inputs = []
        for index, item in enumerate(message.inputs):
            where = f"inputs[{index}]"
            if item.parameters:
                raise InvalidRequest(
                    f"{where}.parameters: none are known, got {list(item.parameters)}"
                )
            shape = tuple(item.shape)
            if raw:
                inputs.append(Tensor(item.name, item.datatype, shape, data=raw[index]))
            else:
                values = _contents(item.contents, item.datatype, where)
                inputs.append(Tensor(item.name, item.datatype, shape, values=values))
        parameters = {key: _parameter(value, key) for key, value in message.parameters.items()}
        outputs = []
        for index, out in enumerate(message.outputs):
            if out.parameters:
                raise InvalidRequest(
                    f"outputs[{index}].parameters: none are known, got {list(out.parameters)}"
                )
            outputs.append((out.name, None))
        return _checked(model, message.id, parameters, inputs, outputs)
    except InvalidRequest as error:
        error.model = model or None
        raise


def _checked(
    model: str,
    request_id: str,
    parameters: dict[str, Any],
    inputs: list[Tensor],
    outputs: Sequence[tuple[str, bool | None]],
) -> V2Request:
    _known(parameters, PARAMETERS, "parameters")
    by_name: dict[str, Tensor] = {}
    for tensor in inputs:
        if tensor.name not in (IMAGES, MIX_PERM, MIX_BOX):
            raise InvalidRequest(
                f"unknown input {tensor.name!r}; inputs are {IMAGES!r}, {MIX_PERM!r}, {MIX_BOX!r}"
            )
        if tensor.name in by_name:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        by_name[tensor.name] = tensor
    if IMAGES not in by_name:
        raise missing(f"input {IMAGES!r}")
    images = _images(by_name[IMAGES])
    mix_mode = _param(parameters, "mix", str)
    mix = None
    if mix_mode is not None:
        if MIX_PERM not in by_name:
            raise missing(f"input {MIX_PERM!r} (mix is {mix_mode!r})")
        perm = _indices(by_name[MIX_PERM], (images.shape[0],))
        box = _indices(by_name[MIX_BOX], (4,)) if MIX_BOX in by_name else None
        mix = checked_mix(mix_mode, perm, _param(parameters, "mix_lam", float), box, images)
    else:
        for name in (MIX_PERM, MIX_BOX):
            if name in by_name:
                raise InvalidRequest(f"input {name!r} needs the parameter mix")
        if "mix_lam" in parameters:
            raise InvalidRequest("parameter mix_lam needs the parameter mix")
    output_dtype = _param(parameters, "output_dtype", str)
    if output_dtype is not None and output_dtype not in OUTPUT_DTYPES:
        raise InvalidRequest(f"output_dtype must be FP32 or FP16, got {output_dtype!r}")
    request = checked_request(
        model=model,
        images=images,
        mix=mix,
        temperature=_param(parameters, "temperature", float),
        output=_param(parameters, "output", str),
        output_dtype=None if output_dtype is None else OUTPUT_DTYPES[output_dtype],
        top_k=_param(parameters, "top_k", int),
        request_id=request_id,
        client_id=_param(parameters, "client_id", str),
    )
    available = (LOGITS,) if request.top_k is None else (TOP_K_VALUES, TOP_K_INDICES)
    names = tuple(name for name, _ in outputs) or available
    for name in names:
        if name not in available:
            raise InvalidRequest(
                f"unknown output {name!r}; this request answers {list(available)}"
                + (" (top_k answers top_k_values and top_k_indices)" if request.top_k else "")
            )
    if len(set(names)) != len(names):
        raise InvalidRequest(f"an output is asked for twice: {list(names)}")
    everything = bool(_param(parameters, "binary_data_output", bool))
    binary = frozenset(name for name, flag in outputs if flag or (flag is None and everything)) | (
        frozenset(names) if not outputs and everything else frozenset()
    )
    timeout_us = _param(parameters, "timeout", int)
    if timeout_us is not None and timeout_us <= 0:
        raise InvalidRequest(f"parameter timeout must be > 0 microseconds, got {timeout_us}")
    timeout_s = None if timeout_us is None else timeout_us / 1e6
    return V2Request(request, names, binary, timeout_s, request_id)


def _images(tensor: Tensor) -> torch.Tensor:
    dtype = IMAGE_TYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidRequest(
            f"input {IMAGES!r} datatype must be one of {sorted(IMAGE_TYPES)}, "
            f"got {preview(tensor.datatype)}"
        )
    data = tensor.data
    if data is None:
        data = _values_bytes(tensor, IMAGES)
    return checked_images(dtype, tensor.shape, data)


def _indices(tensor: Tensor, shape: tuple[int, ...]) -> list[int]:
    where = f"input {tensor.name!r}"
    dtype = INDEX_TYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidRequest(
            f"{where} datatype must be INT32 or INT64, got {preview(tensor.datatype)}"
        )
    if tensor.shape != shape:
        raise InvalidRequest(f"{where} shape must be {list(shape)}, got {list(tensor.shape)}")
    data = tensor.data if tensor.data is not None else _values_bytes(tensor, tensor.name)
    expected = math.prod(shape) * _ITEM_SIZE[tensor.datatype]
    if len(data) != expected:
        raise InvalidRequest(f"{where} has {len(data)} bytes, shape {list(shape)} needs {expected}")
    values: list[int] = torch.frombuffer(bytearray(data), dtype=dtype).tolist()
    return values


def _values_bytes(tensor: Tensor, where: str) -> bytes:
    """The little-endian bytes of a JSON or typed-contents tensor, its values checked."""
    flat = _flatten(tensor.values or [], where)
    if len(flat) > MAX_LISTED_VALUES:
        raise RequestTooLarge(
            f"input {where!r} lists {len(flat)} values, over the {MAX_LISTED_VALUES} a JSON "
            "tensor may hold; send it as binary data"
        )
    if not _valid_shape(tensor.shape):
        raise InvalidRequest(
            f"input {where!r} shape must be a list of ints >= 0, got {list(tensor.shape)}"
        )
    if len(flat) != math.prod(tensor.shape):
        raise InvalidRequest(
            f"input {where!r} has {len(flat)} values but shape {list(tensor.shape)} needs "
            f"{math.prod(tensor.shape)}"
        )
    integral = tensor.datatype in ("UINT8", "INT32", "INT64")
    for value in flat:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(f"input {where!r} data must be numbers, got {preview(value)}")
        if integral and not isinstance(value, int):
            raise InvalidRequest(f"input {where!r} of {tensor.datatype} needs ints, got {value!r}")
    torch_dtype = {**{k: getattr(torch, v) for k, v in IMAGE_TYPES.items()}, **INDEX_TYPES}[
        tensor.datatype
    ]
    if tensor.datatype == "UINT8" and not all(0 <= v <= 255 for v in flat):
        raise InvalidRequest(f"input {where!r} of UINT8 needs values in [0, 255]")
    try:
        values = torch.tensor(flat, dtype=torch.float64 if not integral else torch.int64)
    except (OverflowError, RuntimeError) as exc:
        raise InvalidRequest(
            f"input {where!r} data does not fit {tensor.datatype}: {exc}"
        ) from None
    return bytes(tensor_bytes(values.to(torch_dtype)))


def _flatten(values: Sequence[Any], where: str, depth: int = 0) -> list[Any]:
    if depth > MAX_NESTING:
        raise InvalidRequest(f"input {where!r} data is nested deeper than {MAX_NESTING}")
    if not any(isinstance(v, list) for v in values):
        return list(values)
    flat: list[Any] = []
    for value in values:
        flat.extend(_flatten(value, where, depth + 1) if isinstance(value, list) else [value])
    return flat


def _contents(contents: Any, datatype: str, where: str) -> list[Any]:
    field = {"UINT8": "uint_contents", "FP32": "fp32_contents", "INT32": "int_contents"}.get(
        datatype, "int64_contents" if datatype == "INT64" else None
    )
    if field is None:
        raise InvalidRequest(f"{where} of {preview(datatype)} must come in raw_input_contents")
    listed = getattr(contents, field)
    if len(listed) > MAX_LISTED_VALUES:
        raise RequestTooLarge(
            f"{where} lists {len(listed)} values, over the {MAX_LISTED_VALUES} typed contents "
            "may hold; send it in raw_input_contents"
        )
    values: list[Any] = list(listed)
    return values


def _parameter(value: Any, key: str) -> Any:
    choice = value.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidRequest(f"parameter {key!r} has no value")
    return getattr(value, choice)


def _param(parameters: Mapping[str, Any], key: str, kind: type) -> Any:
    value = parameters.get(key)
    if value is None:
        return None
    if kind is float and _is_int(value):
        return float(value)
    if (kind is int and not _is_int(value)) or (kind is not int and not isinstance(value, kind)):
        raise InvalidRequest(f"parameter {key} must be {kind.__name__}, got {preview(value)}")
    if kind is float and not math.isfinite(value):
        raise InvalidRequest(f"parameter {key} must be finite, got {value!r}")
    return value


def _check_version(model: str, version: str) -> None:
    if version not in ("", MODEL_VERSION):
        raise ModelNotFound(f"model {model!r} has only version {MODEL_VERSION}, not {version!r}")


def _header_length(value: str, body: bytes) -> int:
    if not value.isdigit() or int(value) > len(body):
        raise InvalidRequest(
            f"{HEADER_LENGTH} must be an int in [0, {len(body)}] (the body's length), "
            f"got {value!r:.40}"
        )
    return int(value)


def _tensor_head(item: Mapping[str, Any], where: str) -> tuple[str, str, tuple[int, ...]]:
    name = _string(item.get("name"), f"{where}.name")
    datatype = _string(item.get("datatype"), f"{where}.datatype")
    shape = item.get("shape")
    if not isinstance(shape, list) or not _valid_shape(shape):
        raise InvalidRequest(f"{where}.shape must be a list of ints >= 0, got {preview(shape)}")
    return name, datatype, tuple(shape)


def _valid_shape(shape: Sequence[Any]) -> bool:
    return len(shape) <= 8 and all(_is_int(d) and 0 <= d < 2**31 for d in shape)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be a JSON object, got {preview(value)}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        raise missing(where)
    if not isinstance(value, list):
        raise InvalidRequest(f"{where} must be a list, got {preview(value)}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where} must be a non-empty string, got {preview(value)}")
    return value


def _known(fields: Mapping[str, Any], known: frozenset[str] | set[str], where: str) -> None:
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise InvalidRequest(f"unknown {where} field(s) {unknown}; known: {sorted(known)}")


# ---- results ------------------------------------------------------------------------------


def _answers(result: InferResult, names: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    tensors = {
        LOGITS: result.logits,
        TOP_K_VALUES: result.top_k_values,
        TOP_K_INDICES: result.top_k_indices,
    }
    answers = []
    for name in names:
        tensor = tensors[name]
        if tensor is None:
            raise AssertionError(f"the result has no {name}")
        answers.append((name, tensor))
    return answers


def result_to_rest(result: InferResult, v2req: V2Request) -> tuple[bytes, int | None]:
    """The REST answer's body and, when some output is binary, its JSON header's length."""
    outputs, blobs = [], []
    for name, tensor in _answers(result, v2req.outputs):
        out: dict[str, Any] = {
            "name": name,
            "datatype": OUTPUT_TYPES[_dtype(tensor)],
            "shape": list(tensor.shape),
        }
        if name in v2req.binary:
            data = tensor_bytes(tensor)
            out["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            out["data"] = tensor.reshape(-1).tolist()
        outputs.append(out)
    header: dict[str, Any] = {
        "model_name": result.model,
        "model_version": MODEL_VERSION,
        "outputs": outputs,
    }
    if v2req.request_id:
        header["id"] = v2req.request_id
    if result.members:
        header["parameters"] = {MEMBERS: ",".join(result.members)}
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def result_to_grpc(result: InferResult, v2req: V2Request) -> bytes:
    """A serialized ModelInferResponse with raw_output_contents."""
    message = v2.ModelInferResponse(
        model_name=result.model, model_version=MODEL_VERSION, id=v2req.request_id
    )
    if result.members:
        message.parameters[MEMBERS].string_param = ",".join(result.members)
    for name, tensor in _answers(result, v2req.outputs):
        message.outputs.add(name=name, datatype=OUTPUT_TYPES[_dtype(tensor)], shape=tensor.shape)
        message.raw_output_contents.append(bytes(tensor_bytes(tensor)))
    return message.SerializeToString()


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# ---- metadata -----------------------------------------------------------------------------


def server_metadata() -> dict[str, Any]:
    """`GET /v2` and ServerMetadata."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(info: ModelInfo) -> dict[str, Any]:
    """`GET /v2/models/{name}` and ModelMetadata: one input, one output (see the module doc)."""
    height, width = info.input_size
    return {
        "name": info.name,
        "versions": [MODEL_VERSION],
        "platform": "kdserve_ensemble" if info.kind == "ensemble" else "kdserve_pytorch",
        "inputs": [{"name": IMAGES, "datatype": "UINT8", "shape": [-1, 3, height, width]}],
        "outputs": [{"name": LOGITS, "datatype": "FP32", "shape": [-1, info.num_classes]}],
    }


def find_model(models: Sequence[ModelInfo], name: str, version: str = "") -> ModelInfo:
    """The served model `name` (and version), or ModelNotFound."""
    _check_version(name, version)
    for info in models:
        if info.name == name:
            return info
    served = sorted(info.name for info in models)
    raise ModelNotFound(f"model {name!r} is not served here; served: {served}")


def model_metadata_to_grpc(info: ModelInfo) -> bytes:
    fields = model_metadata(info)
    message = v2.ModelMetadataResponse(
        name=fields["name"], versions=fields["versions"], platform=fields["platform"]
    )
    for tensor in fields["inputs"]:
        message.inputs.add(**tensor)
    for tensor in fields["outputs"]:
        message.outputs.add(**tensor)
    return message.SerializeToString()
