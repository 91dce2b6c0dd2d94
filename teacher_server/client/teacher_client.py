"""The client students use: `TeacherClient.connect("grpc://host:50051", token=...)`.

It sends uint8 (or unit-float) views and mix parameters and gets raw or tempered teacher
outputs back as tensors. Several endpoints are used round robin with failover; the one retry
policy (`retry.RetryPolicy`) decides what is tried again; a batch over the server's message
limit is split into several requests and the answers are joined in order (`chunking`, which
also checks every answer's request id).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypedDict, TypeVar, Unpack

import torch

from teacher_server.client.chunking import Part, TeacherReply, join_parts, split_request
from teacher_server.client.connections import Connection, open_connection
from teacher_server.client.retry import RetryPolicy
from teacher_server.client.tls import ClientTls
from teacher_server.shared.contract import (
    InferRequest,
    InferResult,
    Mix,
    ModelInfo,
    ModelList,
    Output,
    OutputDtype,
)
from teacher_server.shared.errors import DeadlineExceeded, NotReady, TeacherError

log = logging.getLogger(__name__)
T = TypeVar("T")
FAILED_ENDPOINT_PAUSE_S = 1.0
WARN_AFTER_S = 1.0
"""A call that has been retrying this long logs each further retry as a warning."""


class InferOptions(TypedDict, total=False):
    """Keyword options of every infer call (all optional)."""

    model: str
    temperature: float
    mix: Mix | None
    output: Output
    output_dtype: OutputDtype
    request_id: str
    timeout_s: float
    client_id: str
    """Whom the server batches the request as (default: the client's own `client_id`)."""


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


class TeacherClient:
    """A client of one teacher service reachable at one or more endpoints (thread-safe)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        token: str | None = None,
        model: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        max_request_bytes: int | None = None,
        tls: ClientTls | None = None,
        allow_insecure_token: bool = False,
        client_id: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("TeacherClient needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.model = model
        self.client_id = client_id or uuid.uuid4().hex
        """Sent with every request: the server's batches take clients in turn (fairness)."""
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._connections: list[Connection] = [
            open_connection(u, token, tls=tls, allow_insecure_token=allow_insecure_token)
            for u in self.endpoints
        ]
        self._turn = itertools.count()
        self._failed_until = [0.0] * len(self._connections)
        self._max_request_bytes = max_request_bytes
        self._served: ModelList | None = None
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, endpoints: str | Sequence[str], **options: Any) -> TeacherClient:
        """`"grpc://host:50051"`, `"https://host:8443"`, or a list (round robin + failover);
        or one gRPC target of replicas, `"dns:///teacher:50051"`, `"ipv4:a:p,b:p"` (grpcio's
        round robin over the healthy ones; `teacher_server.shared.endpoints`).

        `tls=ClientTls(ca=..., cert=..., key=...)` for https:// and grpcs:// endpoints; a token
        is refused over clear text to a non-loopback host unless `allow_insecure_token`.
        """
        urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        return cls(urls, **options)

    def infer(self, images: torch.Tensor, **options: Unpack[InferOptions]) -> torch.Tensor:
        """Teacher outputs (N, num_classes) for the view `images` (N, 3, H, W)."""
        reply = self.request(images, **options)
        if reply.logits is None:
            raise TeacherError(f"answer to {reply.request_id!r} carries no logits")
        return reply.logits

    def infer_top_k(self, images: torch.Tensor, k: int, **options: Unpack[InferOptions]) -> TopK:
        """The k largest outputs per image and their class indices."""
        reply = self.request(images, top_k=k, **options)
        if reply.top_k_values is None or reply.top_k_indices is None:
            raise TeacherError(f"answer to {reply.request_id!r} carries no top-k")
        return TopK(reply.top_k_values, reply.top_k_indices)

    def request(
        self, images: torch.Tensor, *, top_k: int | None = None, **options: Unpack[InferOptions]
    ) -> TeacherReply:
        """The whole answer (outputs, each part's result and timings); split over the limit."""
        request = self._request(images, top_k, options)
        timeout_s = options.get("timeout_s") or self.timeout_s
        deadline = time.monotonic() + self.retry.budget_s(timeout_s)
        limit_bytes, limit_images = self._request_limits(request.model, deadline, timeout_s)
        parts = split_request(request, limit_bytes, limit_images)
        results = [self._infer_part(part, deadline, timeout_s) for part in parts]
        return join_parts(request.request_id, parts, results)

    def _infer_part(self, part: Part, deadline: float, timeout_s: float) -> InferResult:
        return self._call(
            lambda c: c.infer(part.request, _left(deadline, timeout_s)),
            deadline,
            f"request {part.request.request_id!r}",
        )

    def list_models(self, timeout_s: float | None = None) -> list[ModelInfo]:
        """Every model and ensemble the teacher serves."""
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + self.retry.budget_s(timeout_s)
        return list(self._model_list(deadline, timeout_s).models)

    def close(self) -> None:
        for connection in self._connections:
            connection.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self, images: torch.Tensor, top_k: int | None, options: InferOptions
    ) -> InferRequest:
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
        return InferRequest(
            model=model,
            images=images.detach().to("cpu"),
            mix=options.get("mix"),
            temperature=float(options.get("temperature", 1.0)),
            output=options.get("output", "logits"),
            output_dtype=options.get("output_dtype", "float32"),
            top_k=top_k,
            request_id=options.get("request_id") or uuid.uuid4().hex,
            client_id=options.get("client_id") or self.client_id,
        )

    def _request_limits(self, model: str, deadline: float, timeout_s: float) -> tuple[int, int]:
        """The bytes and images one request to `model` may carry (0: no limit said); the
        server's model list is asked once."""
        if self._served is None:
            self._served = self._model_list(deadline, timeout_s)
        limit_bytes = self._max_request_bytes or self._served.limits.max_request_bytes
        info = next((m for m in self._served.models if m.name == model), None)
        return limit_bytes, 0 if info is None else info.max_images

    def _model_list(self, deadline: float, timeout_s: float) -> ModelList:
        return self._call(
            lambda c: c.list_models(_left(deadline, timeout_s)), deadline, "the model list"
        )

    def _pick(self) -> tuple[int, Connection]:
        """Round robin, skipping endpoints that failed a moment ago unless all did."""
        now = time.monotonic()
        with self._lock:
            start = next(self._turn)
            count = len(self._connections)
            order = [(start + i) % count for i in range(count)]
            healthy = [i for i in order if self._failed_until[i] <= now]
            index = (healthy or order)[0]
        return index, self._connections[index]

    def _call(self, send: Callable[[Connection], T], deadline: float, what: str) -> T:
        """`send` on an endpoint, retried by the policy on this or another endpoint."""
        started = time.monotonic()
        warned = False
        for attempt in itertools.count():
            index, connection = self._pick()
            try:
                answer = send(connection)
            except TeacherError as error:
                if isinstance(error, NotReady | DeadlineExceeded):
                    with self._lock:
                        self._failed_until[index] = time.monotonic() + FAILED_ENDPOINT_PAUSE_S
                delay = self.retry.delay_s(attempt, error, deadline - time.monotonic())
                if delay is None:
                    raise
                if isinstance(error, NotReady) and self._any_endpoint_healthy():
                    delay = 0.0
                waited = time.monotonic() - started
                if waited + delay >= WARN_AFTER_S:
                    warned = True
                    log.warning(
                        "teacher unavailable for %s (%s); waited %.0fs so far, retrying in %.1fs",
                        what,
                        error.message,
                        waited,
                        delay,
                    )
                time.sleep(delay)
                continue
            if warned:
                log.warning(
                    "teacher answered %s after %.0fs of waiting", what, time.monotonic() - started
                )
            return answer
        raise AssertionError("unreachable")

    def _any_endpoint_healthy(self) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(until <= now for until in self._failed_until)


def _left(deadline: float, timeout_s: float) -> float:
    """The next try's timeout: what is left of the call, at most the call's own timeout."""
    return max(0.001, min(timeout_s, deadline - time.monotonic()))


__all__ = ["InferOptions", "RetryPolicy", "TeacherClient", "TeacherReply", "TopK"]
