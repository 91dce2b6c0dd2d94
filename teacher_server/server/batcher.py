"""Dynamic batching for one model: a bounded queue of images feeding one worker per replica.

Policy: a free replica starts at once when no replica of the model is busy (a lone student
pays no batching delay) or when the request at the head is already being computed in part;
while another replica computes, it waits until max_batch_size images are queued or the
oldest has waited max_delay_ms. Requests queue while a replica computes, so a busy server
forms full batches on its own. Queued images are shared among idle replicas, so one-thread
CPU replicas compute even a lone request side by side. Sizes count images, not requests;
a request larger than a pass is computed in several passes. A pass takes the clients with
queued images in turn (each its equal share of the pass, from its oldest request on), so one
student with many requests queued cannot starve another; and when the queue is full, a
client holding less than its equal share of it gets room: the newest requests of the client
holding the most are pushed out with QueueFull. A request whose view is the same
as one queued or computing (`sharing`) follows it: it costs no queue room and no forward, and
is answered with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from teacher_server.server.sharing import InFlight
from teacher_server.server.stats import ModelStats
from teacher_server.shared.contract import Mix
from teacher_server.shared.errors import (
    DeadlineExceeded,
    ModelFailure,
    NotReady,
    QueueFull,
    RequestTooLarge,
    TeacherError,
)

log = logging.getLogger(__name__)
MIN_SPLIT_IMAGES = 8


@dataclass(eq=False)
class Job:
    """One request's images for one model; `on_done` runs once when it finishes or fails (from any
    thread), never after `Batcher.cancel`.

    A job with a `key` may lead a forward that other jobs of the same view follow (their
    `leader`); a leader whose caller went away is `abandoned` but computed for its followers.
    """

    images: torch.Tensor
    mix: Mix | None
    deadline: float
    on_done: Callable[[Job], None]
    enqueued_at: float = field(default_factory=time.monotonic)
    logits: torch.Tensor | None = None
    error: TeacherError | None = None
    next_row: int = 0
    rows_done: int = 0
    started_at: float | None = None
    compute_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    finished: bool = False
    client: str = ""
    """Who sent it (`InferRequest.client_id`, or the connection): passes take clients in turn."""
    key: bytes | None = None
    """The view's `sharing.view_key`; None: never shared."""
    leader: Job | None = None
    followers: list[Job] = field(default_factory=list)
    abandoned: bool = False

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


Chunk = tuple[Job, int, int]


class Runner(Protocol):
    """One replica as the batcher drives it (`engine.ModelRunner` is one): fill a batch, run it."""

    def new_batch(self, size: int) -> torch.Tensor: ...

    def padded_size(self, size: int) -> int: ...

    def prepare(
        self, images: torch.Tensor, start: int, stop: int, mix: Mix | None, out: torch.Tensor
    ) -> None: ...

    def forward(self, views: torch.Tensor) -> torch.Tensor: ...


class Batcher:
    """Queue + worker threads of one served model (one thread per replica)."""

    def __init__(
        self,
        name: str,
        runners: Sequence[Runner],
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue_images: int,
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue_images = max_queue_images
        self.stats = ModelStats(name, pending_images=lambda: self._queued_images)
        self._runners = list(runners)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._queued_images = 0
        self._in_flight: InFlight[Job] = InFlight()
        self._busy = 0
        self._closed = False
        self._seconds_per_image = 0.0
        self._passes = 0
        self._last_served: dict[str, int] = {}
        """Each client with images queued: the pass that last took some of them (0: none)."""
        self._threads = [
            threading.Thread(
                target=self._work, args=(runner,), name=f"kdserve-{name}-{i}", daemon=True
            )
            for i, runner in enumerate(self._runners)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Enqueue, or follow a job of the same view in flight, or raise QueueFull (with a retry
        hint), RequestTooLarge or NotReady; never blocks. The queue limit holds for the first
        job too: nothing overfills an empty queue."""
        if job.size > self.max_queue_images:
            raise RequestTooLarge(
                f"request of {job.size} images is over model {self.name!r}'s whole queue "
                f"(max_queue_images {self.max_queue_images}); split it"
            )
        with self._cond:
            if self._closed:
                raise NotReady(f"model {self.name!r} is shutting down")
            expired = self._pop_expired(time.monotonic())
            leader = self._in_flight.leader_for(job)
            full = leader is None and self._queued_images + job.size > self.max_queue_images
            pushed = self._push_out(job) if full else []
            full = full and pushed is None
            if leader is not None:
                job.leader = leader
                leader.followers.append(job)
                leader.deadline = max(leader.deadline, job.deadline)
            elif not full:
                self._queue.append(job)
                self._queued_images += job.size
                self._in_flight.add(job)
                self._cond.notify()
            retry = self._retry_after_s()
            queued = self._queued_images
        self._fail_expired(expired)
        for victim in pushed or ():
            self._fail(
                victim,
                QueueFull(
                    f"model {self.name!r}'s queue is full and this client holds more than its "
                    f"equal share of it: this request made room for another client's; retry in "
                    f"{retry:.2f}s",
                    retry_after_s=retry,
                ),
            )
        if full:
            raise QueueFull(
                f"model {self.name!r} has {queued} images queued (max_queue_images "
                f"{self.max_queue_images}), no room for {job.size} more; retry in {retry:.2f}s",
                retry_after_s=retry,
            )

    def _push_out(self, job: Job) -> list[Job] | None:
        """Room in a full queue for a client that holds less than its equal share of it: the
        newest requests not started (nor followed) of the clients holding the most, while
        they hold more than their share, are taken off the queue for the caller to fail with
        QueueFull (their client retries). None: no room is made (lock held)."""
        held: dict[str, int] = {job.client: 0}
        movable: dict[str, list[Job]] = {}
        for queued in self._queue:
            held[queued.client] = held.get(queued.client, 0) + queued.size - queued.next_row
            if queued.client != job.client and queued.next_row == 0 and not queued.followers:
                movable.setdefault(queued.client, []).append(queued)
        share = self.max_queue_images // len(held)
        if held[job.client] + job.size > share:
            return None
        need = self._queued_images + job.size - self.max_queue_images
        victims: list[Job] = []
        while need > 0:
            richest = max((c for c in movable if movable[c]), key=held.__getitem__, default=None)
            if richest is None or held[richest] <= share:
                return None
            victim = movable[richest].pop()
            victims.append(victim)
            held[richest] -= victim.size
            need -= victim.size
        for victim in victims:
            self._unqueue(victim)
            self._in_flight.remove(victim)
        return victims

    def cancel(self, job: Job) -> None:
        """Forget a job whose caller went away; rows not started are never computed (unless
        other requests follow it)."""
        with self._cond:
            if job.finished:
                return
            if job.leader is not None:
                job.finished = True
                self._leave(job)
            elif job.followers:
                job.abandoned = True
            else:
                self._drop(job)

    def _drop(self, job: Job) -> None:
        """A leader nobody waits for any more (lock held)."""
        job.finished = True
        self._unqueue(job)
        self._in_flight.remove(job)

    def _leave(self, follower: Job) -> None:
        """A follower stops waiting for its leader (lock held)."""
        leader = follower.leader
        assert leader is not None
        leader.followers.remove(follower)
        if leader.abandoned and not leader.followers:
            self._drop(leader)

    def _settle(self, job: Job) -> list[Job]:
        """A leader is done (answered or failed): hand its outcome to its followers; the jobs
        to notify (lock held)."""
        job.finished = True
        self._in_flight.remove(job)
        for follower in job.followers:
            follower.logits, follower.error = job.logits, job.error
            follower.started_at, follower.compute_s = job.started_at, job.compute_s
            follower.batch_sizes = list(job.batch_sizes)
            follower.finished = True
        if job.error is None and job.followers:
            self.stats.record_shared(sum(follower.size for follower in job.followers))
        return list(job.followers) + ([] if job.abandoned else [job])

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers after their current batch; fail what is still queued with NotReady."""
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._queued_images = 0
            self._cond.notify_all()
        for job in dropped:
            if job.started_at is None:
                what = "before this request ran"
            else:
                what = f"after {job.next_row} of this request's {job.size} images were started"
            self._fail(job, NotReady(f"model {self.name!r} shut down {what}"))
        for thread in self._threads:
            thread.join(timeout_s)

    def _retry_after_s(self) -> float:
        backlog = self._queued_images * self._seconds_per_image / len(self._runners)
        return min(5.0, max(0.01, backlog))

    def _work(self, runner: Runner) -> None:
        while True:
            chunks = self._gather()
            if chunks is None:
                return
            try:
                self._compute(runner, chunks)
            except Exception as exc:
                log.exception("model %r: a pass failed after its forward", self.name)
                for job, _, _ in chunks:
                    self._fail(job, ModelFailure(f"model {self.name!r} failed: {exc}"))
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _gather(self) -> list[Chunk] | None:
        """Block until a batch should start (see the module doc); None once closed."""
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    expired = self._pop_expired(now)
                    if self._closed or expired:
                        break
                    if self._queued_images == 0:
                        self._cond.wait()
                        continue
                    head = self._queue[0]
                    wait = head.enqueued_at + self.max_delay_s - now
                    if (
                        self._queued_images >= self.max_batch_size
                        or self._busy == 0
                        or head.started_at is not None
                        or wait <= 0
                    ):
                        break
                    self._cond.wait(wait)
                chunks = [] if self._closed or expired else self._take(now, self._batch_limit())
                if chunks:
                    self._busy += 1
                if self._queued_images:
                    self._cond.notify()
            self._fail_expired(expired)
            if chunks:
                return chunks
            if self._closed:
                return None

    def _pop_expired(self, now: float) -> list[Job]:
        """Queued jobs whose deadline passed, whether or not some of their rows were computed:
        a long request stops between passes; and their followers whose own deadline passed
        (lock held)."""
        expired = [job for job in self._queue if job.deadline <= now]
        for job in expired:
            self._unqueue(job)
        return expired + [
            follower
            for job in self._queue
            for follower in job.followers
            if follower.deadline <= now
        ]

    def _fail_expired(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            waited = now - job.enqueued_at
            if job.leader is not None:
                what = (
                    f"waited {waited:.3f}s in model {self.name!r} for the forward it shares with "
                    "a request of the same view"
                )
            elif job.started_at is None:
                what = f"waited {waited:.3f}s in model {self.name!r}'s queue; it was not computed"
            else:
                what = (
                    f"ran {waited:.3f}s in model {self.name!r}; {job.next_row} of its "
                    f"{job.size} images were computed or started, the rest were not"
                )
            self._fail(job, DeadlineExceeded(f"request passed its deadline: it {what}"))

    def _unqueue(self, job: Job) -> None:
        """Take a job's rows that are not yet handed out off the queue (lock held)."""
        if job in self._queue:
            self._queue.remove(job)
            self._queued_images -= job.size - job.next_row

    def _batch_limit(self) -> int:
        """Images for this pass: share the queue with idle replicas rather than leave them idle.

        A lone 32-image request on two idle one-thread replicas runs as two passes of 16 side
        by side; a busy server still fills max_batch_size.
        """
        idle = len(self._runners) - self._busy
        share = max(MIN_SPLIT_IMAGES, math.ceil(self._queued_images / idle))
        return min(self.max_batch_size, share)

    def _take(self, now: float, limit: int) -> list[Chunk]:
        """Up to `limit` queued images for one pass, the clients in turn: each turn gives every
        client with images queued an equal share of the room left, from its oldest request on
        (one client alone: first come, first served), the clients served longest ago first,
        so with more clients than room the next pass goes on with the ones left out. Lock
        held."""
        queued: dict[str, deque[Job]] = {}
        for job in self._queue:
            queued.setdefault(job.client, deque()).append(job)
        self._passes += 1
        self._last_served = {c: self._last_served.get(c, 0) for c in queued}
        order = sorted(queued, key=self._last_served.__getitem__)  # stable: oldest job next
        waiting = {client: queued[client] for client in order}
        taken: dict[Job, tuple[int, int]] = {}
        capacity = limit
        while capacity and waiting:
            share = max(1, capacity // len(waiting))
            for client in list(waiting):
                jobs, allowance = waiting[client], min(share, capacity)
                while jobs and allowance:
                    job = jobs[0]
                    if job.started_at is None:
                        job.started_at = now
                        self.stats.record_queue(now - job.enqueued_at)
                    take = min(job.size - job.next_row, allowance)
                    self._last_served[client] = self._passes
                    taken[job] = (taken.get(job, (job.next_row, 0))[0], job.next_row + take)
                    job.next_row += take
                    allowance -= take
                    capacity -= take
                    if job.next_row == job.size:
                        jobs.popleft()
                if not jobs:
                    del waiting[client]
                if not capacity:
                    break
        self._queued_images -= limit - capacity
        if any(job.next_row == job.size for job in taken):
            self._queue = deque(job for job in self._queue if job.next_row < job.size)
        return [(job, start, stop) for job, (start, stop) in taken.items()]

    def _compute(self, runner: Runner, chunks: list[Chunk]) -> None:
        started = time.monotonic()
        try:
            batch = runner.new_batch(sum(stop - start for _, start, stop in chunks))
            offset = 0
            for job, start, stop in chunks:
                runner.prepare(
                    job.images, start, stop, job.mix, batch[offset : offset + stop - start]
                )
                offset += stop - start
            logits = runner.forward(batch)
        except Exception as exc:
            if len(chunks) > 1:
                log.warning(
                    "model %r failed on a batch of %d requests; retrying each alone: %s",
                    self.name,
                    len(chunks),
                    exc,
                )
                for chunk in chunks:
                    self._compute(runner, [chunk])
                return
            log.exception("model %r failed on a request", self.name)
            self._fail(
                chunks[0][0],
                ModelFailure(f"model {self.name!r} failed: {type(exc).__name__}: {exc}"),
            )
            return
        elapsed = time.monotonic() - started
        batch_size = int(logits.shape[0])
        self.stats.record_execution(batch_size, elapsed, runner.padded_size(batch_size))
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / batch_size
        done: list[Job] = []
        offset = 0
        with self._cond:
            for job, start, stop in chunks:
                rows = logits[offset : offset + stop - start]
                offset += stop - start
                if job.finished:
                    continue
                if job.logits is None:
                    job.logits = torch.empty((job.size, rows.shape[1]), dtype=torch.float32)
                job.logits[start:stop] = rows
                job.rows_done += stop - start
                job.compute_s += elapsed
                job.batch_sizes.append(batch_size)
                if job.rows_done == job.size:
                    done += self._settle(job)
        for job in done:
            self._notify(job)

    def _fail(self, job: Job, error: TeacherError) -> None:
        with self._cond:
            if job.finished:
                return
            job.error = error
            if job.leader is not None:
                job.finished = True
                self._leave(job)
                failed = [job]
            else:
                self._unqueue(job)
                failed = self._settle(job)
        for each in failed:
            self._notify(each)

    def _notify(self, job: Job) -> None:
        """Hand a finished job to its caller; a failing callback cannot keep the others waiting."""
        try:
            job.on_done(job)
        except Exception:
            log.exception("model %r: a finished request could not be handed back", self.name)
