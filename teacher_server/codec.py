"""Tensors <-> wire bytes, and the one validation of an inference request for both transports.

Transports turn their message (msgpack map or protobuf) into a plain mapping with the fields
of ARCHITECTURE.md; the core validates it with `parse_request` before anything is queued.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard, cast

import torch

from teacher_server.errors import InvalidRequest
from teacher_server.views import Mix

IMAGE_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
RESPONSE_DTYPES: dict[str, torch.dtype] = {**IMAGE_DTYPES, "int32": torch.int32}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in RESPONSE_DTYPES.items()}

Output = Literal["logits", "probs", "log_probs"]
OutputDtype = Literal["float32", "float16"]
OUTPUTS: tuple[Output, ...] = ("logits", "probs", "log_probs")
OUTPUT_DTYPES: tuple[OutputDtype, ...] = ("float32", "float16")
REQUEST_FIELDS = frozenset(
    {"model", "images", "mix", "temperature", "output", "output_dtype", "top_k", "request_id"}
)
MAX_SIDE = 4096
MAX_DIMS = 8
MAX_DIM = 2**31 - 1
MAX_REQUEST_ID = 256
MSGPACK_CONTENT_TYPE = "application/msgpack"
TIMEOUT_HEADER = "x-request-timeout-ms"
RETRY_AFTER_HEADER = "retry-after-ms"
RETRY_AFTER_METADATA = "retry-after-ms"


@dataclass(frozen=True)
class InferRequest:
    """A validated request: images are a zero-copy view of the received bytes."""

    model: str
    images: torch.Tensor
    mix: Mix | None = None
    temperature: float = 1.0
    output: Output = "logits"
    output_dtype: OutputDtype = "float32"
    top_k: int | None = None
    request_id: str = ""


@dataclass
class Timings:
    """Where a request's time went on the server."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class InferResult:
    """What the server answers: full outputs, or top-k values and indices."""

    model: str
    request_id: str
    logits: torch.Tensor | None = None
    top_k_values: torch.Tensor | None = None
    top_k_indices: torch.Tensor | None = None
    timings: Timings = field(default_factory=Timings)


def tensor_to_wire(tensor: torch.Tensor) -> dict[str, Any]:
    """A CPU tensor -> {dtype, shape, data} with C-order little-endian bytes."""
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(
            f"dtype {tensor.dtype} cannot travel; use one of {sorted(RESPONSE_DTYPES)}"
        )
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"dtype": name, "shape": list(tensor.shape), "data": data}


def tensor_from_wire(
    value: Any, field_name: str, allowed: Mapping[str, torch.dtype] = IMAGE_DTYPES
) -> torch.Tensor:
    """{dtype, shape, data} -> a read-only tensor sharing the bytes; every mismatch is a 400."""
    if not isinstance(value, Mapping):
        raise InvalidRequest(
            f"{field_name} must be a map with dtype, shape, data; got {_kind(value)}"
        )
    unknown = set(value) - {"dtype", "shape", "data"}
    if unknown:
        raise InvalidRequest(f"{field_name} has unknown fields {sorted(unknown)}")
    dtype_name = value.get("dtype")
    if dtype_name not in allowed:
        raise InvalidRequest(
            f"{field_name}.dtype must be one of {sorted(allowed)}, got {dtype_name!r}"
        )
    shape = value.get("shape")
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str | bytes)
        or len(shape) > MAX_DIMS
        or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise InvalidRequest(
            f"{field_name}.shape must be a list of at most {MAX_DIMS} ints in [0, {MAX_DIM}], "
            f"got {_preview(shape)}"
        )
    data = value.get("data")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequest(f"{field_name}.data must be bytes, got {_kind(data)}")
    dtype = allowed[str(dtype_name)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise InvalidRequest(
            f"{field_name}.data has {len(data)} bytes but shape {list(shape)} of {dtype_name} "
            f"needs {expected}"
        )
    if expected == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(data, dtype=dtype)
    return flat.view(tuple(shape))


def parse_request(fields: Any, *, path_model: str | None = None) -> InferRequest:
    """Validate a decoded request body; raises InvalidRequest naming the field and value."""
    if not isinstance(fields, Mapping):
        raise InvalidRequest(f"request body must be a map, got {_kind(fields)}")
    unknown = set(fields) - REQUEST_FIELDS
    if unknown:
        raise InvalidRequest(
            f"unknown request fields {sorted(map(str, unknown))}; known: {sorted(REQUEST_FIELDS)}"
        )
    model = fields.get("model")
    if model is None:
        model = path_model
    elif path_model is not None and model != path_model:
        raise InvalidRequest(f"body model {model!r} differs from the URL's model {path_model!r}")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(f"model must be a non-empty string, got {model!r}")
    if fields.get("images") is None:
        raise InvalidRequest("images is required")
    images = tensor_from_wire(fields["images"], "images")
    _check_images(images)
    temperature = _or_default(fields, "temperature", 1.0)
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise InvalidRequest(f"temperature must be a finite number > 0, got {temperature!r}")
    output = _or_default(fields, "output", "logits")
    if output not in OUTPUTS:
        raise InvalidRequest(f"output must be one of {list(OUTPUTS)}, got {output!r}")
    output_dtype = _or_default(fields, "output_dtype", "float32")
    if output_dtype not in OUTPUT_DTYPES:
        raise InvalidRequest(
            f"output_dtype must be one of {list(OUTPUT_DTYPES)}, got {output_dtype!r}"
        )
    top_k = fields.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise InvalidRequest(f"top_k must be an int >= 1, got {top_k!r}")
    request_id = _or_default(fields, "request_id", "")
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(
            f"request_id must be a string of at most {MAX_REQUEST_ID} characters, "
            f"got {request_id!r:.80}"
        )
    mix = fields.get("mix")
    return InferRequest(
        model=model,
        images=images,
        mix=None if mix is None else _parse_mix(mix, images.shape),
        temperature=float(temperature),
        output=cast(Output, output),
        output_dtype=cast(OutputDtype, output_dtype),
        top_k=top_k,
        request_id=request_id,
    )


def _check_images(images: torch.Tensor) -> None:
    shape = list(images.shape)
    if len(shape) != 4 or shape[1] != 3:
        raise InvalidRequest(f"images must have shape (N, 3, H, W), got {shape}")
    if min(shape) < 1 or max(shape[2:]) > MAX_SIDE:
        raise InvalidRequest(f"images needs N >= 1 and 1 <= H, W <= {MAX_SIDE}, got shape {shape}")
    if images.dtype != torch.uint8:
        low, high = torch.aminmax(images)
        if not (low.item() >= 0.0 and high.item() <= 1.0):
            raise InvalidRequest(
                "float images must lie in [0, 1] (and be finite), "
                f"got min {low.item()} max {high.item()}"
            )


def _parse_mix(value: Any, shape: torch.Size) -> Mix:
    count, _, height, width = shape
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"mix must be a map with mode, perm, lam or box; got {_kind(value)}")
    unknown = set(value) - {"mode", "perm", "lam", "box"}
    if unknown:
        raise InvalidRequest(f"mix has unknown fields {sorted(map(str, unknown))}")
    mode = value.get("mode")
    if mode not in ("mixup", "cutmix"):
        raise InvalidRequest(f"mix.mode must be 'mixup' or 'cutmix', got {mode!r}")
    perm = value.get("perm")
    if (
        not isinstance(perm, Sequence)
        or isinstance(perm, str | bytes)
        or len(perm) != count
        or not all(_is_int(i) and 0 <= i < count for i in perm)
    ):
        raise InvalidRequest(
            f"mix.perm must list {count} image indices in [0, {count}), got {_preview(perm)}"
        )
    if mode == "mixup":
        lam = value.get("lam")
        if not _is_number(lam) or not 0.0 <= lam <= 1.0:
            raise InvalidRequest(f"mix.lam must be a number in [0, 1] for mixup, got {lam!r}")
        return Mix("mixup", tuple(perm), lam=float(lam))
    box = value.get("box")
    if (
        not isinstance(box, Sequence)
        or len(box) != 4
        or not all(_is_int(v) for v in box)
        or not (0 <= box[0] <= box[2] <= height and 0 <= box[1] <= box[3] <= width)
    ):
        raise InvalidRequest(
            f"mix.box must be [y0, x0, y1, x1] with 0 <= y0 <= y1 <= {height} and "
            f"0 <= x0 <= x1 <= {width}, got {box!r}"
        )
    y0, x0, y1, x1 = (int(v) for v in box)
    return Mix.cutmix(tuple(perm), (y0, x0, y1, x1), height, width)


def result_to_wire(result: InferResult) -> dict[str, Any]:
    """InferResult -> the response map (msgpack body); absent tensors are left out."""
    body: dict[str, Any] = {
        "model": result.model,
        "request_id": result.request_id,
        "timings": {
            "queue_ms": result.timings.queue_ms,
            "compute_ms": result.timings.compute_ms,
            "total_ms": result.timings.total_ms,
            "batch_sizes": result.timings.batch_sizes,
        },
    }
    for name in ("logits", "top_k_values", "top_k_indices"):
        tensor = getattr(result, name)
        if tensor is not None:
            body[name] = tensor_to_wire(tensor)
    return body


def _or_default(fields: Mapping[str, Any], name: str, default: Any) -> Any:
    """The field's value; the default only when it is absent or null (never for a wrong value)."""
    value = fields.get(name)
    return default if value is None else value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return type(value).__name__


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
