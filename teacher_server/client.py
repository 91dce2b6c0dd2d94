"""The client students use: `TeacherClient.connect("grpc://host:50051", token=...)`.

It sends uint8 (or unit-float) views and mix parameters, and gets raw or tempered teacher
outputs back as tensors. Several endpoints are used round robin with failover; queue-full
and unavailable answers are retried with exponential backoff and jitter; a batch over the
server's message limit is split into several requests and reassembled in order; every
answer's request_id is checked against the request.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypedDict, TypeVar, Unpack

import torch

from teacher_server.codec import (
    RESPONSE_DTYPES,
    Output,
    OutputDtype,
    Timings,
    tensor_from_wire,
    tensor_to_wire,
)
from teacher_server.errors import DeadlineExceeded, NotReady, QueueFull, TeacherError
from teacher_server.transports import Transport, open_transport
from teacher_server.views import Mix

T = TypeVar("T")
RETRYABLE = (NotReady, QueueFull)
REQUEST_OVERHEAD_BYTES = 4096
FAILED_ENDPOINT_PAUSE_S = 1.0


class InferOptions(TypedDict, total=False):
    """Keyword options of every infer call (all optional)."""

    model: str
    temperature: float
    mix: Mix | None
    output: Output
    output_dtype: OutputDtype
    request_id: str
    timeout_s: float


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


@dataclass
class TeacherReply:
    """One answer: full outputs or top-k, with the server's timings (per chunk when split)."""

    model: str
    request_id: str
    logits: torch.Tensor | None
    top_k: TopK | None
    timings: list[Timings] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about one served name."""

    name: str
    kind: str
    num_classes: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: str
    members: tuple[str, ...]
    combine: str
    member_weights: tuple[float, ...]


@dataclass(frozen=True)
class _Part:
    """One wire request of a possibly chunked call: which rows of the caller's batch it answers."""

    fields: dict[str, Any]
    rows: int


class TeacherClient:
    """Sync and async client for one teacher service reachable at one or more endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        token: str | None = None,
        model: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 8,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_request_bytes: int | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("TeacherClient needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._transports: list[Transport] = [open_transport(url, token) for url in self.endpoints]
        self._turn = itertools.count()
        self._failed_until = [0.0] * len(self._transports)
        self._max_request_bytes = max_request_bytes
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, endpoints: str | Sequence[str], **options: Any) -> TeacherClient:
        """`"grpc://host:50051"`, `"http://host:8000"`, or a list (round robin + failover)."""
        urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        return cls(urls, **options)

    # ---- sync API -------------------------------------------------------------------------

    def infer(self, images: torch.Tensor, **options: Unpack[InferOptions]) -> torch.Tensor:
        """Teacher outputs (N, num_classes) for the view `images` (N, 3, H, W)."""
        return _full(self.request(images, **options))

    def infer_top_k(self, images: torch.Tensor, k: int, **options: Unpack[InferOptions]) -> TopK:
        """The k largest outputs per image and their class indices."""
        return _top_k(self.request(images, top_k=k, **options))

    def request(
        self, images: torch.Tensor, *, top_k: int | None = None, **options: Unpack[InferOptions]
    ) -> TeacherReply:
        """The full answer (outputs, request_id, server timings); chunked when over the limit."""
        deadline = self._deadline(options)
        parts, request_id = self._plan(images, top_k, options, self._limit(deadline))
        answers = [self._infer_part(part.fields, deadline) for part in parts]
        return _assemble(parts, answers, request_id)

    def list_models(self, timeout_s: float | None = None) -> list[ModelInfo]:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        return _model_infos(self._call(lambda t: t.describe(_left(deadline)), deadline))

    def close(self) -> None:
        for transport in self._transports:
            transport.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- async API ------------------------------------------------------------------------

    async def infer_async(
        self, images: torch.Tensor, **options: Unpack[InferOptions]
    ) -> torch.Tensor:
        return _full(await self.request_async(images, **options))

    async def infer_top_k_async(
        self, images: torch.Tensor, k: int, **options: Unpack[InferOptions]
    ) -> TopK:
        return _top_k(await self.request_async(images, top_k=k, **options))

    async def request_async(
        self, images: torch.Tensor, *, top_k: int | None = None, **options: Unpack[InferOptions]
    ) -> TeacherReply:
        deadline = self._deadline(options)
        parts, request_id = self._plan(images, top_k, options, await self._limit_async(deadline))
        answers = await asyncio.gather(
            *(self._infer_part_async(part.fields, deadline) for part in parts)
        )
        return _assemble(parts, list(answers), request_id)

    async def list_models_async(self, timeout_s: float | None = None) -> list[ModelInfo]:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        return _model_infos(
            await self._call_async(lambda t: t.describe_async(_left(deadline)), deadline)
        )

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- shared machinery -----------------------------------------------------------------

    def _deadline(self, options: InferOptions) -> float:
        return time.monotonic() + (options.get("timeout_s") or self.timeout_s)

    def _plan(
        self, images: torch.Tensor, top_k: int | None, options: InferOptions, limit: int
    ) -> tuple[list[_Part], str]:
        unknown = set(options) - set(InferOptions.__annotations__)
        if unknown:
            raise TypeError(
                f"unknown options {sorted(unknown)}; known: {sorted(InferOptions.__annotations__)}"
            )
        model = options.get("model") or self.model
        if not model:
            raise ValueError("no model named: pass model=... here or to TeacherClient.connect")
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be (N, 3, H, W) with N >= 1, got {list(images.shape)}")
        request_id = options.get("request_id") or uuid.uuid4().hex
        common = {
            "model": model,
            "temperature": float(options.get("temperature", 1.0)),
            "output": options.get("output", "logits"),
            "output_dtype": options.get("output_dtype", "float32"),
            "top_k": top_k,
        }
        images = images.detach().to("cpu")
        mix = options.get("mix")
        spans = _spans(images, mix, limit)
        parts = []
        for index, (start, stop) in enumerate(spans):
            part_id = request_id if len(spans) == 1 else f"{request_id}/{index}"
            view, part_mix = _rows_with_partners(images, mix, start, stop)
            fields = {**common, "images": tensor_to_wire(view), "request_id": part_id}
            if part_mix is not None:
                fields["mix"] = _mix_fields(part_mix)
            parts.append(_Part(fields, stop - start))
        return parts, request_id

    def _infer_part(self, fields: dict[str, Any], deadline: float) -> dict[str, Any]:
        return self._call(lambda t: t.infer(fields, _left(deadline)), deadline)

    async def _infer_part_async(self, fields: dict[str, Any], deadline: float) -> dict[str, Any]:
        return await self._call_async(lambda t: t.infer_async(fields, _left(deadline)), deadline)

    def _limit(self, deadline: float) -> int:
        if self._max_request_bytes is None:
            described = self._call(lambda t: t.describe(_left(deadline)), deadline)
            self._max_request_bytes = int(described["limits"]["max_request_bytes"])
        return self._max_request_bytes

    async def _limit_async(self, deadline: float) -> int:
        if self._max_request_bytes is None:
            described = await self._call_async(
                lambda t: t.describe_async(_left(deadline)), deadline
            )
            self._max_request_bytes = int(described["limits"]["max_request_bytes"])
        return self._max_request_bytes

    def _pick(self) -> tuple[int, Transport]:
        """Round robin, skipping endpoints that failed a moment ago unless all did."""
        now = time.monotonic()
        with self._lock:
            start = next(self._turn)
            order = [(start + i) % len(self._transports) for i in range(len(self._transports))]
            healthy = [i for i in order if self._failed_until[i] <= now]
            index = (healthy or order)[0]
        return index, self._transports[index]

    def _mark_failed(self, index: int) -> None:
        with self._lock:
            self._failed_until[index] = time.monotonic() + FAILED_ENDPOINT_PAUSE_S

    def _next_delay(self, attempt: int, error: TeacherError, deadline: float) -> float | None:
        """How long to wait before the next try, or None to give up (not retryable or no time)."""
        if not isinstance(error, RETRYABLE) or attempt >= self.retries:
            return None
        if isinstance(error, NotReady) and any(
            until <= time.monotonic() for until in self._failed_until
        ):
            return 0.0
        backoff = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
        delay = max(backoff, error.retry_after_s or 0.0)
        return delay if time.monotonic() + delay < deadline else None

    def _call(self, send: Callable[[Transport], T], deadline: float) -> T:
        for attempt in itertools.count():
            index, transport = self._pick()
            try:
                return send(transport)
            except TeacherError as error:
                if isinstance(error, NotReady | DeadlineExceeded):
                    self._mark_failed(index)
                delay = self._next_delay(attempt, error, deadline)
                if delay is None:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    async def _call_async(self, send: Callable[[Transport], Awaitable[T]], deadline: float) -> T:
        for attempt in itertools.count():
            index, transport = self._pick()
            try:
                return await send(transport)
            except TeacherError as error:
                if isinstance(error, NotReady | DeadlineExceeded):
                    self._mark_failed(index)
                delay = self._next_delay(attempt, error, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


def _full(reply: TeacherReply) -> torch.Tensor:
    if reply.logits is None:
        raise TeacherError(f"answer to {reply.request_id!r} carries no logits")
    return reply.logits


def _top_k(reply: TeacherReply) -> TopK:
    if reply.top_k is None:
        raise TeacherError(f"answer to {reply.request_id!r} carries no top-k")
    return reply.top_k


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _spans(images: torch.Tensor, mix: Mix | None, limit: int) -> list[tuple[int, int]]:
    """Row ranges that fit one message; with mixing, a part also carries its rows' partners."""
    count = int(images.shape[0])
    per_image = images[0].numel() * images.element_size() + (16 if mix is not None else 0)
    fits = max(1, (limit - REQUEST_OVERHEAD_BYTES) // per_image)
    if mix is not None:
        fits = max(1, fits // 2)
    if fits >= count:
        return [(0, count)]
    return [(start, min(count, start + fits)) for start in range(0, count, fits)]


def _rows_with_partners(
    images: torch.Tensor, mix: Mix | None, start: int, stop: int
) -> tuple[torch.Tensor, Mix | None]:
    """Rows start:stop, plus the mix partners outside them, with the mix re-indexed to match.

    The server mixes a request as a whole, so each part must carry every image its rows mix
    with; the extra rows are answered too and dropped by the client.
    """
    if mix is None:
        return images[start:stop], None
    if (start, stop) == (0, int(images.shape[0])):
        return images, mix
    rows = list(range(start, stop))
    extra = sorted({mix.perm[i] for i in rows} - set(rows))
    position = {row: i for i, row in enumerate(rows + extra)}
    perm = tuple(position[mix.perm[i]] for i in rows) + tuple(
        range(len(rows), len(rows) + len(extra))
    )
    return images[rows + extra], Mix(mix.mode, perm, lam=mix.lam, box=mix.box)


def _mix_fields(mix: Mix) -> dict[str, Any]:
    fields: dict[str, Any] = {"mode": mix.mode, "perm": list(mix.perm)}
    if mix.mode == "mixup":
        fields["lam"] = mix.lam
    else:
        assert mix.box is not None
        fields["box"] = list(mix.box)
    return fields


def _assemble(parts: list[_Part], answers: list[dict[str, Any]], request_id: str) -> TeacherReply:
    """Check every part's request_id, keep each part's own rows, and join them in order."""
    full, values, indices, timings = [], [], [], []
    for part, body in zip(parts, answers, strict=True):
        if body.get("request_id") != part.fields["request_id"]:
            raise TeacherError(
                f"answer carries request_id {body.get('request_id')!r}, "
                f"expected {part.fields['request_id']!r}"
            )
        timings.append(Timings(**body["timings"]))
        answered = [body[name]["shape"][0] for name in ("logits", "top_k_values") if name in body]
        if not answered or answered[0] < part.rows:
            raise TeacherError(f"answer to {part.fields['request_id']!r} lacks rows: {answered}")
        if "logits" in body:
            full.append(_tensor(body["logits"], "logits")[: part.rows])
        if "top_k_values" in body:
            values.append(_tensor(body["top_k_values"], "top_k_values")[: part.rows])
            indices.append(_tensor(body["top_k_indices"], "top_k_indices")[: part.rows])
    return TeacherReply(
        model=answers[0]["model"],
        request_id=request_id,
        logits=torch.cat(full) if full else None,
        top_k=TopK(torch.cat(values), torch.cat(indices)) if values else None,
        timings=timings,
    )


def _tensor(value: Any, name: str) -> torch.Tensor:
    return tensor_from_wire(value, name, RESPONSE_DTYPES).clone()


def _model_infos(described: dict[str, Any]) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m["name"],
            kind=m["kind"],
            num_classes=int(m["num_classes"]),
            input_size=(int(m["input_size"][0]), int(m["input_size"][1])),
            mean=tuple(m["mean"]),
            std=tuple(m["std"]),
            dtype=m["dtype"],
            members=tuple(m["members"]),
            combine=m["combine"],
            member_weights=tuple(m["member_weights"]),
        )
        for m in described["models"]
    ]


__all__ = ["ModelInfo", "TeacherClient", "TeacherReply", "TopK"]
