"""Ensemble members on other teacher servers, asked through the students' own client.

A remote member is named `grpc://host:port/model` (or grpcs://, http://, https://), or
`dns:///host:port/model` for a gRPC target of its replicas (balanced by the client), in an
ensemble's members. The front server forwards each request as it came (the view bytes, the
mix parameters and the client_id, so the member's batches take the students in turn; the
member mixes and resizes the view for its own model) and asks for raw float32 logits at
temperature 1, so the ensemble is combined here exactly as from local members. Calls run in
a bounded pool of threads per member (`remote.max_in_flight`; beyond it a request gets 429).
Every failure is a TeacherError naming the member: a member that is down, slow
(`remote.timeout_s`, else the request's deadline), refuses this server's token or no longer
serves the model answers 503 / UNAVAILABLE; its 429, 400, 413 and 500 keep their class.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from teacher_server.client import ClientTls, RetryPolicy, TeacherClient
from teacher_server.client.connections import TimedOut
from teacher_server.server.config import RemoteConfig, RemoteMember
from teacher_server.server.registry import MemberAnswer
from teacher_server.shared.contract import Mix, ModelInfo
from teacher_server.shared.endpoints import parse_endpoint
from teacher_server.shared.errors import (
    InvalidRequest,
    ModelFailure,
    ModelNotFound,
    NotReady,
    QueueFull,
    RequestTooLarge,
    TeacherError,
)

MEMBER_RETRY = RetryPolicy(attempts=2, backoff_s=0.05, max_backoff_s=0.5)
"""Within a request's time: a dropped connection or a full queue is tried again, briefly."""
BUSY_RETRY_S = 0.05
DESCRIBE_TRY_S = 10.0
KEPT_CLASSES: tuple[type[TeacherError], ...] = (
    QueueFull,
    InvalidRequest,
    RequestTooLarge,
    ModelFailure,
)
"""A member's errors that keep their class here; every other one makes the member unavailable."""


class RemoteModel:
    """One model on another teacher server (thread-safe; the registry's `RemoteModel`)."""

    def __init__(self, member: RemoteMember, settings: RemoteConfig) -> None:
        self.name = member.url
        self.member = member
        self.settings = settings
        self.num_classes = 0
        self._client = self._new_client(MEMBER_RETRY, settings.timeout_s or 60.0)
        self._pool = ThreadPoolExecutor(
            settings.max_in_flight, thread_name_prefix=f"kdserve-member-{member.model}"
        )
        self._lock = threading.Lock()
        self._in_flight = 0

    def _new_client(self, retry: RetryPolicy, timeout_s: float) -> TeacherClient:
        """A client of the member's server; ValueError for a token in clear text off loopback."""
        settings = self.settings
        secure = parse_endpoint(self.member.endpoint).secure
        return TeacherClient(
            [self.member.endpoint],
            token=settings.token.get_secret_value() if settings.token else None,
            model=self.member.model,
            timeout_s=timeout_s,
            retry=retry,
            tls=ClientTls(settings.tls_ca, settings.tls_cert, settings.tls_key) if secure else None,
            allow_insecure_token=settings.allow_insecure_token,
        )

    def describe(self, wait_s: float) -> ModelInfo:
        """What the member's server says about the model, retried for up to `wait_s`."""
        patient = RetryPolicy(attempts=None, max_backoff_s=2.0, patience_s=wait_s)
        with self._new_client(patient, min(wait_s, DESCRIBE_TRY_S)) as client:
            models = client.list_models()
        info = next((m for m in models if m.name == self.member.model), None)
        if info is None:
            served = sorted(m.name for m in models)
            raise ModelNotFound(
                f"{self.member.endpoint} does not serve {self.member.model!r}; served: {served}"
            )
        self.num_classes = info.num_classes
        return info

    def submit(
        self, images: torch.Tensor, mix: Mix | None, deadline: float, client_id: str
    ) -> Future[MemberAnswer]:
        """Send a request on a pool thread; QueueFull when max_in_flight are out already."""
        with self._lock:
            if self._in_flight >= self.settings.max_in_flight:
                raise QueueFull(
                    f"ensemble member {self.name} has {self._in_flight} requests in flight "
                    "(remote.max_in_flight); retry",
                    retry_after_s=BUSY_RETRY_S,
                )
            self._in_flight += 1
        try:
            future = self._pool.submit(self._ask, images, mix, deadline, client_id)
        except RuntimeError:
            self._release()
            raise NotReady("server is shutting down") from None
        future.add_done_callback(self._release)
        return future

    def _release(self, _: object = None) -> None:
        with self._lock:
            self._in_flight -= 1

    def _ask(
        self, images: torch.Tensor, mix: Mix | None, deadline: float, client_id: str
    ) -> MemberAnswer:
        sent = time.monotonic()
        limit_s = min(deadline - sent, self.settings.timeout_s or math.inf)
        if limit_s <= 0:
            raise NotReady(f"ensemble member {self.name}: no time left to ask it")
        try:
            reply = self._client.request(images, mix=mix, timeout_s=limit_s, client_id=client_id)
        except TimedOut:
            raise NotReady(
                f"ensemble member {self.name} is unavailable: no answer in {limit_s:.2f}s"
            ) from None
        except TeacherError as error:
            raise member_error(self.name, error) from None
        logits = reply.logits
        expected = (int(images.shape[0]), self.num_classes)
        if logits is None or tuple(logits.shape) != expected or logits.dtype != torch.float32:
            got = "nothing" if logits is None else f"{list(logits.shape)} {logits.dtype}"
            raise ModelFailure(
                f"ensemble member {self.name} answered {got}, expected float32 logits of shape "
                f"{list(expected)}"
            )
        queue_s = min(part.timings.queue_ms for part in reply.parts) / 1000.0
        return MemberAnswer(
            logits,
            started_at=sent + queue_s,
            compute_s=sum(part.timings.compute_ms for part in reply.parts) / 1000.0,
            batch_sizes=tuple(size for part in reply.parts for size in part.timings.batch_sizes),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def member_error(member: str, error: TeacherError) -> TeacherError:
    """A member's error as this server answers it, naming the member (see the module doc)."""
    kept = next((cls for cls in KEPT_CLASSES if isinstance(error, cls)), None)
    if kept is not None:
        return kept(f"ensemble member {member}: {error.message}", retry_after_s=error.retry_after_s)
    return NotReady(
        f"ensemble member {member} is unavailable: {error.message}",
        retry_after_s=error.retry_after_s,
    )


def connect(member: RemoteMember, settings: RemoteConfig) -> RemoteModel:
    """The registry's `ConnectRemote`."""
    return RemoteModel(member, settings)
