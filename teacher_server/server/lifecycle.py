"""A request's way through the server, whichever transport carried it.

transport decode -> validate (the contract's checked constructors, run by `wire`) ->
`Lifecycle.infer`: route to the model or the ensemble's members, queue on their batchers (or
send to a remote member's server) and wait -> the batchers' engines preprocess and run the
forward -> combine (the members that answered, where a quorum allows fewer than all) and
temper (`outputs`) -> the transport encodes the InferResult. Every failure is a TeacherError from
the one error table; the transports only decode, call this and encode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from teacher_server.server.batcher import Job
from teacher_server.server.config import TeacherConfig
from teacher_server.server.outputs import combine_members, finish_outputs
from teacher_server.server.registry import (
    MemberAnswer,
    Registry,
    Served,
    ServedEnsemble,
    ServedModel,
)
from teacher_server.server.sharing import view_key
from teacher_server.server.stats import ModelStats
from teacher_server.shared.contract import (
    InferRequest,
    InferResult,
    ModelList,
    ServerLimits,
    Timings,
)
from teacher_server.shared.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelFailure,
    NotReady,
    QueueFull,
    RequestTooLarge,
    TeacherError,
    Unauthenticated,
    status_of,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
OUTCOMES: dict[type[TeacherError], str] = {
    QueueFull: "queue_full",
    DeadlineExceeded: "deadline_exceeded",
    ModelFailure: "failed",
    InvalidRequest: "invalid",
}
"""The `outcome` label a request gets for each error (others: `rejected`)."""


class Lifecycle:
    """What every transport asks of the server: authorize, size limit, infer, describe, stats."""

    def __init__(self, config: TeacherConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.max_request_bytes = config.server.max_request_bytes
        token = config.server.auth_token
        self._token = None if token is None else token.get_secret_value().encode()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        """Every model loaded and warmed up, and not shutting down."""
        return self.registry.ready

    def model_stats(self) -> list[ModelStats]:
        """The counters of every model and ensemble (for `/metrics`)."""
        return self.registry.all_stats()

    def authorize(self, authorization: str | None) -> None:
        """Check an `Authorization: Bearer <token>` value when the server has a token."""
        if self._token is None:
            return
        if not authorization:
            raise Unauthenticated("missing token: send `authorization: Bearer <token>`")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), self._token
        ):
            raise Unauthenticated("wrong token in `authorization` (expected `Bearer <token>`)")

    def check_size(self, size: int, *, partial: bool = False) -> None:
        """Refuse a body of `size` bytes (`partial`: read so far) over max_request_bytes."""
        if size > self.max_request_bytes:
            raise RequestTooLarge(
                f"body of {'at least ' if partial else ''}{size} bytes is over the limit of "
                f"{self.max_request_bytes} bytes (max_request_bytes)"
            )

    async def infer(
        self,
        decode: Callable[[], InferRequest],
        *,
        timeout_s: float | None = None,
        peer: str = "",
    ) -> InferResult:
        """Decode and validate a request, queue it on every member model, wait, combine, temper.

        `decode` is the transport's decoder bound to the body, so a request that fails
        validation is counted against the model it named. `peer` (the connection) is the
        client a request without a client_id is batched as. An unexpected exception becomes a
        500 / INTERNAL TeacherError.
        """
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._answer(decode, timeout_s, peer)
        except (TeacherError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("unexpected error while answering a request")
            raise TeacherError(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def decoded(self, decode: Callable[[], T]) -> T:
        """Run a transport's decoder; an invalid request is counted against the model it named."""
        try:
            return decode()
        except InvalidRequest as error:
            self.registry.record_invalid(error.model)
            raise

    @property
    def in_flight(self) -> int:
        """Requests being answered now (decoded or not)."""
        return self._in_flight

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until no request is being answered; False if some still are."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _answer(
        self, decode: Callable[[], InferRequest], timeout_s: float | None, peer: str
    ) -> InferResult:
        received = time.monotonic()
        request = self.decoded(decode)
        if not request.client_id and peer:
            request = dataclasses.replace(request, client_id=peer)
        target = self.registry.get(request.model)
        try:
            result = await self._infer(target, request, received, timeout_s)
        except TeacherError as error:
            target.stats.record_outcome(OUTCOMES.get(type(error), "rejected"))
            raise
        except asyncio.CancelledError:
            target.stats.record_outcome("cancelled")
            raise
        target.stats.record_outcome("ok", images=int(request.images.shape[0]))
        return result

    async def _infer(
        self, target: Served, request: InferRequest, received: float, timeout_s: float | None
    ) -> InferResult:
        if request.top_k is not None and request.top_k > target.num_classes:
            raise InvalidRequest(
                f"top_k must be <= num_classes ({target.num_classes}), got {request.top_k}"
            )
        self._check_work(target, int(request.images.shape[0]))
        answers = await self._ask_members(target, request, received, timeout_s)
        raw, used = _combined(target, answers)
        outputs = finish_outputs(
            raw,
            temperature=request.temperature,
            output=request.output,
            output_dtype=request.output_dtype,
            top_k=request.top_k,
        )
        return InferResult(
            model=target.name,
            request_id=request.request_id,
            logits=outputs.full,
            top_k_values=outputs.top_k_values,
            top_k_indices=outputs.top_k_indices,
            timings=_timings([a for a in answers if isinstance(a, MemberAnswer)], received),
            members=used,
        )

    def _check_work(self, target: Served, images: int) -> None:
        """Refuse a request that asks more compute than one request may: the images it would
        be resized to, not its body, are the work (1x1 images upsample to the model's size)."""
        allowed = self.config.max_images(target.name)
        if images > allowed:
            server = self.config.server
            pixels = self.config.request_pixels(target.name)
            raise RequestTooLarge(
                f"request of {images} images for {target.name!r} is over the {allowed} one "
                f"request may carry (max_request_images {server.max_request_images}, "
                f"max_request_pixels {server.max_request_pixels} at {pixels} pixels per image); "
                "split it"
            )

    async def _ask_members(
        self, target: Served, request: InferRequest, received: float, timeout_s: float | None
    ) -> list[MemberAnswer | TeacherError]:
        """Queue the request on every local member's batcher and send it to every remote one;
        each member's answer or error once all are in.

        A member that refuses the request at once fails the whole request unless a quorum
        can still be reached without it. If the caller goes away (cancellation) the jobs are
        taken off the queues, so rows not started are never computed.
        """
        limit = self.config.server.request_timeout_s
        if timeout_s is not None and math.isfinite(timeout_s):
            limit = min(limit, timeout_s)
        deadline = received + limit
        loop = asyncio.get_running_loop()
        key = self._view_key(target, request)
        submitted: list[tuple[Job, ServedModel]] = []
        sent: list[Future[MemberAnswer]] = []
        asked: list[asyncio.Future[Job] | asyncio.Future[MemberAnswer] | TeacherError] = []
        try:
            for member in target.members:
                try:
                    if isinstance(member, ServedModel):
                        future: asyncio.Future[Job] = loop.create_future()
                        job = Job(
                            request.images,
                            request.mix,
                            deadline,
                            _resolver(loop, future),
                            enqueued_at=received,
                            key=key,
                            client=request.client_id,
                        )
                        member.batcher.submit(job)
                        submitted.append((job, member))
                        asked.append(future)
                    else:
                        remote = member.submit(
                            request.images, request.mix, deadline, request.client_id
                        )
                        sent.append(remote)
                        asked.append(asyncio.wrap_future(remote))
                except TeacherError as error:
                    refused = sum(isinstance(a, TeacherError) for a in asked) + 1
                    if len(target.members) - refused < target.needed:
                        raise
                    asked.append(error)
            return list(
                await asyncio.gather(
                    *(
                        _timed(target, member.name, _answer_of(source))
                        for member, source in zip(target.members, asked, strict=True)
                    )
                )
            )
        except BaseException:
            for job, model in submitted:
                model.batcher.cancel(job)
            for remote in sent:
                remote.cancel()
            raise

    def _view_key(self, target: Served, request: InferRequest) -> bytes | None:
        """The key local members share forwards by (None: sharing is off or every member is
        remote); it reads at most `sharing.SAMPLE_BYTES` of a large view, so it stays on the
        event loop."""
        if not self.config.server.share_forwards or not any(
            isinstance(member, ServedModel) for member in target.members
        ):
            return None
        return view_key(request.images, request.mix)

    def describe(self) -> ModelList:
        """Models plus the limits a client needs (e.g. to split big batches)."""
        server = self.config.server
        return ModelList(
            models=self.registry.describe(),
            limits=ServerLimits(
                max_request_bytes=server.max_request_bytes,
                max_batch_size=server.max_batch_size,
                max_queue_images=server.max_queue_images,
                max_request_images=server.max_request_images,
                max_request_pixels=server.max_request_pixels,
            ),
        )

    def stats(self) -> dict[str, Any]:
        """`GET /v1/stats`: readiness and every model's counters."""
        return {"ready": self.ready, "models": {s.name: s.snapshot() for s in self.model_stats()}}


def _resolver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Job]
) -> Callable[[Job], None]:
    """Called by a batcher thread when a job is done; hands the job back to the event loop."""

    def on_done(job: Job) -> None:
        loop.call_soon_threadsafe(_settle, future, job)

    return on_done


def _settle(future: asyncio.Future[Job], job: Job) -> None:
    if not future.done():
        future.set_result(job)


async def _answer_of(
    source: asyncio.Future[Job] | asyncio.Future[MemberAnswer] | TeacherError,
) -> MemberAnswer | TeacherError:
    """A member's answer or error: a local job once its batcher is done with it, or a remote
    member's answer (its errors name the member); an unexpected error is a 500."""
    if isinstance(source, TeacherError):
        return source
    try:
        done = await source
    except TeacherError as error:
        return error
    except Exception as exc:
        log.exception("unexpected error from a remote member")
        return TeacherError(f"internal error: {type(exc).__name__}: {exc}")
    if isinstance(done, MemberAnswer):
        return done
    if done.error is not None:
        return done.error
    if done.logits is None:
        return TeacherError("internal error: a finished job has no logits")
    started = done.started_at if done.started_at is not None else done.enqueued_at
    return MemberAnswer(done.logits, started, done.compute_s, tuple(done.batch_sizes))


async def _timed(
    target: Served, member: str, answer: Awaitable[MemberAnswer | TeacherError]
) -> MemberAnswer | TeacherError:
    """An ensemble member's answer, its latency and failure counted in the ensemble's stats."""
    started = time.monotonic()
    result = await answer
    if isinstance(target, ServedEnsemble):
        failure = status_of(result).name if isinstance(result, TeacherError) else None
        target.stats.record_member(member, time.monotonic() - started, failure)
    return result


def _combined(
    target: Served, answers: list[MemberAnswer | TeacherError]
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The raw logits of a model, or its members combined at T = 1 and the members used.

    A plain model's or a whole ensemble's failure is raised as it is; with a quorum, members
    that failed are left out (their weights too) as long as enough answered. A request the
    members refuse as bad (400, 413) is refused whatever the quorum.
    """
    failures = [a for a in answers if isinstance(a, TeacherError)]
    if not isinstance(target, ServedEnsemble):
        if failures:
            raise failures[0]
        answer = answers[0]
        assert isinstance(answer, MemberAnswer)
        return answer.logits, ()
    bad = [f for f in failures if isinstance(f, InvalidRequest | RequestTooLarge)]
    if bad:
        raise bad[0]
    used = [
        (member.name, answer.logits, weight)
        for member, answer, weight in zip(
            target.members, answers, target.member_weights, strict=True
        )
        if isinstance(answer, MemberAnswer)
    ]
    if failures and len(used) < target.needed:
        first = failures[0]
        if target.needed == len(target.members):
            raise first
        raise type(first)(
            f"ensemble {target.name!r}: {len(used)} of {len(target.members)} members answered, "
            f"its quorum is {target.needed}; {first.message}",
            retry_after_s=first.retry_after_s,
        )
    if sum(weight for _, _, weight in used) <= 0:
        raise NotReady(
            f"ensemble {target.name!r}: only members of weight 0 answered "
            f"({[name for name, _, _ in used]}); {failures[0].message}"
        )
    if failures:
        target.stats.record_partial_answer()
    raw = combine_members(
        [logits for _, logits, _ in used], [w for _, _, w in used], target.config.combine
    )
    return raw, tuple(name for name, _, _ in used)


def _timings(answers: list[MemberAnswer], received: float) -> Timings:
    started = min((a.started_at for a in answers), default=received)
    return Timings(
        queue_ms=max(0.0, started - received) * 1000.0,
        compute_ms=max((a.compute_s for a in answers), default=0.0) * 1000.0,
        total_ms=(time.monotonic() - received) * 1000.0,
        batch_sizes=tuple(size for a in answers for size in a.batch_sizes),
    )
