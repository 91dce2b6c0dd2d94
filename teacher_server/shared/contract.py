"""The wire contract both sides share: requests, results, mixes, timings, tensors, model lists.

`wire` maps these types to and from msgpack maps (HTTP) and protobuf messages (gRPC). Every
value it decodes is built by the `checked_*` constructors below, the one validation of the
contract: HTTP and gRPC accept the same requests and refuse the same ones with the same
InvalidRequest message. A tensor travels as its dtype name, its shape and its raw C-order
little-endian bytes; `len(data) == prod(shape) * itemsize` is checked.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from teacher_server.shared.errors import InvalidRequest

TENSOR_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int32": torch.int32,
}
IMAGE_DTYPES = {name: TENSOR_DTYPES[name] for name in ("uint8", "float16", "bfloat16", "float32")}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TENSOR_DTYPES.items()}

Output = Literal["logits", "probs", "log_probs"]
OutputDtype = Literal["float32", "float16"]
MixMode = Literal["mixup", "cutmix"]
OUTPUTS: tuple[Output, ...] = ("logits", "probs", "log_probs")
OUTPUT_DTYPES: tuple[OutputDtype, ...] = ("float32", "float16")
MIX_MODES: tuple[MixMode, ...] = ("mixup", "cutmix")
MAX_SIDE = 4096
MAX_DIMS = 8
MAX_DIM = 2**31 - 1
MAX_REQUEST_ID = 256
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 10_000.0
"""The temperatures a request may ask for: beyond them the tempered outputs overflow or carry
no information (the server also refuses an answer that would not be finite in its dtype)."""


@dataclass(frozen=True)
class Mix:
    """Mixup/cutmix parameters of one request; `perm[i]` is the partner of image i.

    mixup: view_i = lam * x_i + (1 - lam) * x_perm[i].
    cutmix: view_i = x_i with the box [y0:y1, x0:x1] pasted from x_perm[i]; lam is the kept
    area fraction, so the mixed label is lam * y_i + (1 - lam) * y_perm[i] in both modes.
    """

    mode: MixMode
    perm: tuple[int, ...]
    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None

    @classmethod
    def cutmix(
        cls, perm: tuple[int, ...], box: tuple[int, int, int, int], height: int, width: int
    ) -> Mix:
        """A cutmix whose `lam` is the kept area fraction of a (height, width) view."""
        y0, x0, y1, x1 = box
        kept = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return cls("cutmix", perm, lam=kept, box=box)


@dataclass(frozen=True)
class InferRequest:
    """One inference request; on the server, `images` is a read-only view of the received bytes."""

    model: str
    images: torch.Tensor
    mix: Mix | None = None
    temperature: float = 1.0
    output: Output = "logits"
    output_dtype: OutputDtype = "float32"
    top_k: int | None = None
    request_id: str = ""
    client_id: str = ""
    """Who sends it (a student run): the batcher takes requests round robin per client; empty,
    the server uses the connection."""


@dataclass(frozen=True)
class Timings:
    """Where a request's time went on the server."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0
    batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class InferResult:
    """What the server answers: full outputs, or top-k values and their int32 class indices."""

    model: str
    request_id: str
    logits: torch.Tensor | None = None
    top_k_values: torch.Tensor | None = None
    top_k_indices: torch.Tensor | None = None
    timings: Timings = Timings()
    members: tuple[str, ...] = ()
    """An ensemble's members whose answers were combined (all of them unless it has a quorum)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about one served name (ensembles: members, combine, weights)."""

    name: str
    kind: str
    num_classes: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: str
    members: tuple[str, ...] = ()
    combine: str = ""
    member_weights: tuple[float, ...] = ()
    max_images: int = 0
    """Images one request to this name may carry (0: the server did not say)."""


@dataclass(frozen=True)
class ServerLimits:
    """The limits a client needs, e.g. to split a batch over max_request_bytes."""

    max_request_bytes: int
    max_batch_size: int
    max_queue_images: int
    max_request_images: int = 0
    max_request_pixels: int = 0


@dataclass(frozen=True)
class ModelList:
    """The answer to `GET /v1/models` and `ListModels`."""

    models: tuple[ModelInfo, ...]
    limits: ServerLimits


def dtype_name(tensor: torch.Tensor) -> str:
    """The wire name of a tensor's dtype; ValueError for one that cannot travel."""
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(f"dtype {tensor.dtype} cannot travel; use one of {sorted(TENSOR_DTYPES)}")
    return name


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's C-order little-endian bytes; a contiguous CPU tensor's memory is shared."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def missing(field: str) -> InvalidRequest:
    """The error for a required field that is absent."""
    return InvalidRequest(f"{field} is required")


def byte_count(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """The bytes of a C-order tensor of this dtype and shape."""
    return math.prod(shape) * dtype.itemsize


def checked_tensor(
    field: str,
    dtype: str,
    shape: Sequence[int],
    data: bytes | memoryview,
    allowed: Mapping[str, torch.dtype] = TENSOR_DTYPES,
) -> torch.Tensor:
    """A read-only tensor sharing `data`; a bad dtype, shape or byte count is InvalidRequest."""
    if dtype not in allowed:
        raise InvalidRequest(f"{field}.dtype must be one of {sorted(allowed)}, got {dtype!r}")
    if len(shape) > MAX_DIMS or not all(0 <= d <= MAX_DIM for d in shape):
        raise InvalidRequest(
            f"{field}.shape must be a list of at most {MAX_DIMS} ints in [0, {MAX_DIM}], "
            f"got {preview(list(shape))}"
        )
    torch_dtype = allowed[dtype]
    expected = byte_count(torch_dtype, shape)
    if len(data) != expected:
        raise InvalidRequest(
            f"{field}.data has {len(data)} bytes but shape {list(shape)} of {dtype} "
            f"needs {expected}"
        )
    if expected == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(data, dtype=torch_dtype)
    return flat.view(tuple(shape))


def checked_images(dtype: str, shape: Sequence[int], data: bytes | memoryview) -> torch.Tensor:
    """A request's images: (N, 3, H, W), N >= 1, sides up to MAX_SIDE, floats in [0, 1]."""
    images = checked_tensor("images", dtype, shape, data, IMAGE_DTYPES)
    sizes = list(images.shape)
    if len(sizes) != 4 or sizes[1] != 3:
        raise InvalidRequest(f"images must have shape (N, 3, H, W), got {sizes}")
    if min(sizes) < 1 or max(sizes[2:]) > MAX_SIDE:
        raise InvalidRequest(f"images needs N >= 1 and 1 <= H, W <= {MAX_SIDE}, got shape {sizes}")
    if images.dtype != torch.uint8:
        low, high = torch.aminmax(images)
        if not (low.item() >= 0.0 and high.item() <= 1.0):
            raise InvalidRequest(
                "float images must lie in [0, 1] (and be finite), "
                f"got min {low.item()} max {high.item()}"
            )
    return images


def checked_mix(
    mode: str,
    perm: Sequence[int],
    lam: float | None,
    box: Sequence[int] | None,
    images: torch.Tensor,
) -> Mix:
    """The mix of a request's `images`; cutmix's lam is derived from its box, never read."""
    count, _, height, width = images.shape
    if mode not in MIX_MODES:
        raise InvalidRequest(f"mix.mode must be 'mixup' or 'cutmix', got {mode!r}")
    if len(perm) != count or not all(0 <= i < count for i in perm):
        raise InvalidRequest(
            f"mix.perm must list {count} image indices in [0, {count}), got {preview(list(perm))}"
        )
    if mode == "mixup":
        if lam is None or not 0.0 <= lam <= 1.0:
            raise InvalidRequest(f"mix.lam must be a number in [0, 1] for mixup, got {lam!r}")
        return Mix("mixup", tuple(perm), lam=float(lam))
    if (
        box is None
        or len(box) != 4
        or not (0 <= box[0] <= box[2] <= height and 0 <= box[1] <= box[3] <= width)
    ):
        raise InvalidRequest(
            f"mix.box must be [y0, x0, y1, x1] with 0 <= y0 <= y1 <= {height} and "
            f"0 <= x0 <= x1 <= {width}, got {None if box is None else list(box)!r}"
        )
    y0, x0, y1, x1 = box
    return Mix.cutmix(tuple(perm), (y0, x0, y1, x1), height, width)


def checked_request(
    *,
    model: str | None,
    images: torch.Tensor,
    mix: Mix | None,
    temperature: float | None,
    output: str | None,
    output_dtype: str | None,
    top_k: int | None,
    request_id: str | None,
    client_id: str | None = None,
) -> InferRequest:
    """A request from its decoded fields; None means absent and takes the default."""
    if not model:
        raise InvalidRequest(f"model must be a non-empty string, got {model!r}")
    temperature = 1.0 if temperature is None else temperature
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
            f"got {temperature!r}"
        )
    output = "logits" if output is None else output
    if output not in OUTPUTS:
        raise InvalidRequest(f"output must be one of {list(OUTPUTS)}, got {output!r}")
    output_dtype = "float32" if output_dtype is None else output_dtype
    if output_dtype not in OUTPUT_DTYPES:
        raise InvalidRequest(
            f"output_dtype must be one of {list(OUTPUT_DTYPES)}, got {output_dtype!r}"
        )
    if top_k is not None and top_k < 1:
        raise InvalidRequest(f"top_k must be an int >= 1, got {top_k!r}")
    request_id = "" if request_id is None else request_id
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(
            f"request_id must be a string of at most {MAX_REQUEST_ID} characters, "
            f"got {request_id!r:.80}"
        )
    client_id = "" if client_id is None else client_id
    if len(client_id) > MAX_REQUEST_ID:
        raise InvalidRequest(
            f"client_id must be a string of at most {MAX_REQUEST_ID} characters, "
            f"got {client_id!r:.80}"
        )
    return InferRequest(
        model=model,
        images=images,
        mix=mix,
        temperature=float(temperature),
        output=output,
        output_dtype=output_dtype,
        top_k=top_k,
        request_id=request_id,
        client_id=client_id,
    )


def preview(value: object) -> str:
    """A value as an error message shows it: its repr, cut at 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
