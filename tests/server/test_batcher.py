"""The batcher's policy, driven directly with fake CPU replicas: no server, no model."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from teacher_server.server.batcher import Batcher, Job
from teacher_server.server.sharing import FULL_KEY_BYTES, SAMPLE_BYTES, InFlight, view_key
from teacher_server.shared.contract import Mix
from teacher_server.shared.errors import (
    DeadlineExceeded,
    ModelFailure,
    NotReady,
    QueueFull,
    RequestTooLarge,
)
from teacher_server.shared.views import apply_mix, mix_views

TIMEOUT_S = 5.0
"""Safety net of every wait: a handshake that does not happen within it is a failure."""
IMAGE_SHAPE = (3, 4, 4)


class FakeRunner:
    """A CPU replica whose logits are its views' pixels; it can hold a pass or fail on a value."""

    def __init__(self, poison: float | None = None) -> None:
        self.poison = poison
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.prepared: list[float] = []
        self.passes: list[list[float]] = []

    @property
    def sizes(self) -> list[int]:
        return [len(ids) for ids in self.passes]

    def hold(self) -> None:
        """Make the next passes block in `forward` until `release` is set."""
        self.release.clear()
        self.entered.clear()

    def new_batch(self, size: int) -> torch.Tensor:
        return torch.full((size, *IMAGE_SHAPE), float("nan"))

    def padded_size(self, size: int) -> int:
        return size

    def prepare(
        self, images: torch.Tensor, start: int, stop: int, mix: Mix | None, out: torch.Tensor
    ) -> None:
        views = images[start:stop].float()
        self.prepared.extend(views[:, 0, 0, 0].tolist())
        if mix is not None:
            partners = images.index_select(0, torch.tensor(mix.perm[start:stop])).float()
            views = apply_mix(views, partners, mix)
        out.copy_(views)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        ids = views[:, 0, 0, 0].tolist()
        self.passes.append(ids)
        self.entered.set()
        assert self.release.wait(TIMEOUT_S), "the test never released this replica"
        if self.poison in ids:
            raise RuntimeError(f"poisoned image {self.poison}")
        return views.flatten(1).clone()


class Finished:
    """The jobs whose `on_done` ran, in order; `wait` blocks until the given ones are there."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.jobs: list[Job] = []

    def __call__(self, job: Job) -> None:
        with self._cond:
            self.jobs.append(job)
            self._cond.notify_all()

    def wait(self, *jobs: Job) -> None:
        with self._cond:
            done = self._cond.wait_for(lambda: all(job in self.jobs for job in jobs), TIMEOUT_S)
        assert done, f"{sum(job not in self.jobs for job in jobs)} of {len(jobs)} jobs never done"
        assert all(self.jobs.count(job) == 1 for job in jobs), "on_done ran twice for a job"

    def job(self, images: torch.Tensor, mix: Mix | None = None, deadline_s: float = 60.0) -> Job:
        """A job due `deadline_s` from now (negative: already past) that reports here."""
        return Job(images, mix, time.monotonic() + deadline_s, self)


def request(first_id: int, count: int) -> torch.Tensor:
    """`count` images whose pixels all hold their id: first_id, first_id + 1, ..."""
    ids = torch.arange(first_id, first_id + count, dtype=torch.float32)
    return ids.view(-1, 1, 1, 1).expand(-1, *IMAGE_SHAPE).contiguous()


def assert_answered(job: Job) -> None:
    """The job succeeded and each of its logits rows is its own image."""
    assert job.error is None
    assert job.logits is not None
    torch.testing.assert_close(job.logits, job.images.float().flatten(1), rtol=0, atol=0)


@pytest.fixture
def finished() -> Finished:
    return Finished()


@pytest.fixture
def make_batcher():
    """Build batchers over fake runners; at the end release every runner and close them."""
    made: list[tuple[Batcher, list[FakeRunner]]] = []

    def make(*runners: FakeRunner, max_batch_size=8, max_delay_ms=60_000, max_queue_images=1024):
        batcher = Batcher(
            "fake",
            runners,
            max_batch_size=max_batch_size,
            max_delay_ms=max_delay_ms,
            max_queue_images=max_queue_images,
        )
        made.append((batcher, list(runners)))
        return batcher

    yield make
    for batcher, runners in made:
        for runner in runners:
            runner.release.set()
        batcher.close(timeout_s=TIMEOUT_S)


def start_held(batcher: Batcher, runner: FakeRunner, finished: Finished) -> Job:
    """Submit a one-image job (id 0) and return once `runner` is blocked computing it."""
    runner.hold()
    job = finished.job(request(0, 1))
    batcher.submit(job)
    assert runner.entered.wait(TIMEOUT_S), "the replica never started the blocking job"
    return job


def test_sizes_count_images_and_requests_split_across_passes(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=8)
    blocker = start_held(batcher, runner, finished)
    jobs = [
        finished.job(request(first_id, count)) for first_id, count in ((100, 3), (200, 6), (300, 8))
    ]
    for job in jobs:
        batcher.submit(job)
    runner.release.set()
    finished.wait(blocker, *jobs)

    assert runner.passes == [
        [0.0],
        [100.0, 101.0, 102.0, 200.0, 201.0, 202.0, 203.0, 204.0],
        [205.0, 300.0, 301.0, 302.0, 303.0, 304.0, 305.0, 306.0],
        [307.0],
    ]
    for job in (blocker, *jobs):
        assert_answered(job)
    assert [job.batch_sizes for job in jobs] == [[8], [8, 8], [8, 1]]
    snapshot = batcher.stats.snapshot()
    assert snapshot["executions"] == 4
    assert snapshot["executed_images"] == 18
    assert snapshot["max_batch_size"] == 8
    assert batcher.stats.batch_sizes == Counter({1: 2, 8: 2})
    assert snapshot["pending_images"] == 0


def test_idle_replica_starts_a_lone_request_without_waiting_the_delay(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=64, max_delay_ms=60_000)
    job = finished.job(request(10, 3))
    batcher.submit(job)
    finished.wait(job)
    assert_answered(job)
    assert runner.sizes == [3]
    assert job.batch_sizes == [3]


def test_requests_queued_behind_a_busy_replica_are_gathered_into_one_pass(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=64, max_delay_ms=60_000)
    blocker = start_held(batcher, runner, finished)
    second, third = finished.job(request(10, 2)), finished.job(request(20, 3))
    batcher.submit(second)
    batcher.submit(third)
    runner.release.set()
    finished.wait(blocker, second, third)

    assert runner.passes == [[0.0], [10.0, 11.0, 20.0, 21.0, 22.0]]
    for job in (blocker, second, third):
        assert_answered(job)
    assert second.batch_sizes == third.batch_sizes == [5]


def test_expired_requests_are_dropped_without_being_computed(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner)
    blocker = start_held(batcher, runner, finished)
    expired = finished.job(request(10, 2), deadline_s=-1.0)
    on_time = finished.job(request(20, 2))
    batcher.submit(expired)
    batcher.submit(on_time)
    runner.release.set()
    finished.wait(blocker, expired, on_time)

    assert isinstance(expired.error, DeadlineExceeded)
    assert "not computed" in expired.error.message
    assert expired.logits is None
    assert runner.prepared == [0.0, 20.0, 21.0]
    assert runner.passes == [[0.0], [20.0, 21.0]]
    assert_answered(blocker)
    assert_answered(on_time)


def test_failed_batch_is_retried_one_request_at_a_time(make_batcher, finished):
    runner = FakeRunner(poison=21.0)
    batcher = make_batcher(runner)
    blocker = start_held(batcher, runner, finished)
    good, poisoned = finished.job(request(10, 2)), finished.job(request(20, 2))
    batcher.submit(good)
    batcher.submit(poisoned)
    runner.release.set()
    finished.wait(blocker, good, poisoned)

    assert runner.passes == [[0.0], [10.0, 11.0, 20.0, 21.0], [10.0, 11.0], [20.0, 21.0]]
    assert_answered(good)
    assert good.batch_sizes == [2]
    assert isinstance(poisoned.error, ModelFailure)
    assert "poisoned image 21.0" in poisoned.error.message
    assert poisoned.logits is None
    assert batcher.stats.batch_sizes == Counter({1: 1, 2: 1})


def test_submit_over_max_queue_images_raises_queue_full(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_queue_images=4)
    start_held(batcher, runner, finished)
    batcher.submit(finished.job(request(10, 3)))

    with pytest.raises(QueueFull) as refused:
        batcher.submit(finished.job(request(20, 2)))
    assert refused.value.retry_after_s is not None
    assert 0 < refused.value.retry_after_s <= 5.0
    assert "3 images queued" in refused.value.message
    batcher.submit(finished.job(request(30, 1)))
    assert batcher.stats.snapshot()["pending_images"] == 4


def test_the_queue_limit_holds_for_the_first_request_too(make_batcher, finished):
    """An empty queue once took any request: 20,000 images against max_queue_images 128."""
    runner = FakeRunner()
    batcher = make_batcher(runner, max_queue_images=4)
    with pytest.raises(RequestTooLarge, match="5 images is over model 'fake'"):
        batcher.submit(finished.job(request(10, 5)))
    assert runner.passes == [] and batcher.stats.snapshot()["pending_images"] == 0
    whole = finished.job(request(20, 4))
    batcher.submit(whole)
    finished.wait(whole)
    assert_answered(whole)


def test_expired_requests_free_the_queue_for_new_ones(make_batcher, finished):
    """A request past its deadline does not hold room in the queue while every replica works."""
    runner = FakeRunner()
    batcher = make_batcher(runner, max_queue_images=4)
    blocker = start_held(batcher, runner, finished)
    stale = finished.job(request(10, 4), deadline_s=0.05)
    batcher.submit(stale)
    time.sleep(0.1)
    fresh = finished.job(request(20, 4))
    batcher.submit(fresh)
    finished.wait(stale)
    assert isinstance(stale.error, DeadlineExceeded)
    runner.release.set()
    finished.wait(blocker, fresh)
    assert_answered(fresh)


def test_a_long_request_stops_between_passes_once_its_deadline_passed(make_batcher, finished):
    runner = FakeRunner()
    runner.hold()
    batcher = make_batcher(runner, max_batch_size=2)
    job = finished.job(request(10, 8), deadline_s=0.3)
    batcher.submit(job)
    assert runner.entered.wait(TIMEOUT_S)
    time.sleep(0.4)
    runner.release.set()
    finished.wait(job)

    assert isinstance(job.error, DeadlineExceeded)
    assert "2 of its 8 images were computed or started" in job.error.message
    assert runner.passes == [[10.0, 11.0]]


def test_close_says_how_much_of_a_request_had_started(make_batcher, finished):
    runner = FakeRunner()
    runner.hold()
    batcher = make_batcher(runner, max_batch_size=2)
    job = finished.job(request(10, 6))
    batcher.submit(job)
    assert runner.entered.wait(TIMEOUT_S)
    closing = threading.Thread(target=batcher.close, kwargs={"timeout_s": TIMEOUT_S})
    closing.start()
    finished.wait(job)
    runner.release.set()
    closing.join(TIMEOUT_S)

    assert isinstance(job.error, NotReady)
    assert "after 2 of this request's 6 images were started" in job.error.message


def test_close_fails_queued_jobs_with_not_ready_and_finishes_the_current_pass(
    make_batcher, finished
):
    runner = FakeRunner()
    batcher = make_batcher(runner)
    blocker = start_held(batcher, runner, finished)
    queued = [finished.job(request(10, 2)), finished.job(request(20, 1))]
    for job in queued:
        batcher.submit(job)

    closing = threading.Thread(target=batcher.close, kwargs={"timeout_s": TIMEOUT_S})
    closing.start()
    finished.wait(*queued)
    runner.release.set()
    closing.join(TIMEOUT_S)
    assert not closing.is_alive()

    for job in queued:
        assert isinstance(job.error, NotReady)
        assert job.logits is None
    assert_answered(blocker)
    assert runner.prepared == [0.0]
    with pytest.raises(NotReady):
        batcher.submit(finished.job(request(30, 1)))


def test_idle_replicas_share_a_lone_request(make_batcher, finished):
    runners = FakeRunner(), FakeRunner()
    for runner in runners:
        runner.hold()
    batcher = make_batcher(*runners, max_batch_size=64)
    job = finished.job(request(100, 32))
    batcher.submit(job)
    for runner in runners:
        assert runner.entered.wait(TIMEOUT_S), "a replica stayed idle beside a lone request"
    for runner in runners:
        runner.release.set()
    finished.wait(job)

    assert [runner.sizes for runner in runners] == [[16], [16]]
    prepared = sorted(image_id for runner in runners for image_id in runner.prepared)
    assert prepared == [float(image_id) for image_id in range(100, 132)]
    assert_answered(job)
    assert job.batch_sizes == [16, 16]


@pytest.mark.parametrize(
    "mix",
    [
        Mix("mixup", tuple(range(11, -1, -1)), lam=0.3),
        Mix.cutmix((5, 9, 0, 11, 2, 7, 1, 10, 3, 6, 8, 4), (1, 0, 3, 2), height=4, width=4),
    ],
    ids=["mixup", "cutmix"],
)
def test_request_split_across_passes_is_mixed_as_a_whole(make_batcher, finished, mix):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=8)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator)
    job = finished.job(images, mix)
    batcher.submit(job)
    finished.wait(job)

    assert runner.sizes == [8, 4]
    assert job.error is None
    expected = mix_views(images.float(), mix).flatten(1)
    torch.testing.assert_close(job.logits, expected, rtol=0, atol=0)


def test_a_failing_callback_keeps_no_other_caller_waiting(make_batcher, finished):
    """One caller's on_done raising (its event loop closed, say) is logged; the rest are told."""
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=64)
    blocker = start_held(batcher, runner, finished)

    def broken(job: Job) -> None:
        raise RuntimeError("Event loop is closed")

    first = Job(request(10, 2), None, time.monotonic() + 60, broken)
    second = finished.job(request(20, 2))
    batcher.submit(first)
    batcher.submit(second)
    runner.release.set()
    finished.wait(blocker, second)
    assert runner.passes[1] == [10.0, 11.0, 20.0, 21.0]
    assert_answered(second)


def keyed(finished: Finished, images: torch.Tensor, mix: Mix | None = None, **options) -> Job:
    """A job that may share its forward (the key the lifecycle gives it)."""
    job = finished.job(images, mix, **options)
    job.key = view_key(images, mix)
    return job


def test_the_same_view_in_flight_costs_one_forward_and_no_queue_room(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=64, max_queue_images=4)
    blocker = start_held(batcher, runner, finished)
    leader = keyed(finished, request(10, 3))
    followers = [keyed(finished, request(10, 3)) for _ in range(3)]
    for job in (leader, *followers):
        batcher.submit(job)  # 3 queued images: the followers would not fit in the queue
    assert batcher.stats.snapshot()["pending_images"] == 3
    runner.release.set()
    finished.wait(blocker, leader, *followers)

    assert runner.passes == [[0.0], [10.0, 11.0, 12.0]]
    for job in (leader, *followers):
        assert_answered(job)
        assert job.batch_sizes == [3] and job.started_at == leader.started_at
    assert all(job.logits is leader.logits for job in followers)
    assert batcher.stats.shared_images == 9
    later = keyed(finished, request(10, 3))
    batcher.submit(later)  # the answered forward is not a cache: this one is computed
    finished.wait(later)
    assert runner.passes[-1] == [10.0, 11.0, 12.0] and len(runner.passes) == 3


def test_other_bytes_mix_or_dtype_are_not_shared_even_with_a_colliding_key(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=64)
    blocker = start_held(batcher, runner, finished)
    leader = keyed(finished, request(10, 2))
    mixed = keyed(finished, request(10, 2), Mix("mixup", (1, 0), lam=0.5))
    halved = keyed(finished, request(10, 2).half())
    collided = finished.job(request(20, 2))
    collided.key = leader.key  # a hash collision: the equality check keeps them apart
    unkeyed = finished.job(request(10, 2))
    for job in (leader, mixed, halved, collided, unkeyed):
        batcher.submit(job)
    runner.release.set()
    finished.wait(blocker, leader, mixed, halved, collided, unkeyed)

    assert sum(runner.sizes) == 1 + 10 and batcher.stats.shared_images == 0
    for job in (leader, halved, collided, unkeyed):
        assert_answered(job)


def test_a_leader_whose_caller_left_is_computed_for_its_followers(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=64)
    blocker = start_held(batcher, runner, finished)
    leader, follower = keyed(finished, request(10, 2)), keyed(finished, request(10, 2))
    alone, alone_follower = keyed(finished, request(20, 2)), keyed(finished, request(20, 2))
    for job in (leader, follower, alone, alone_follower):
        batcher.submit(job)
    batcher.cancel(leader)
    batcher.cancel(alone_follower)
    batcher.cancel(alone)  # nobody waits for 20, 21 any more: never computed
    runner.release.set()
    finished.wait(blocker, follower)

    assert_answered(follower)
    assert runner.passes == [[0.0], [10.0, 11.0]]
    assert leader not in finished.jobs and alone not in finished.jobs
    assert alone_follower not in finished.jobs
    assert batcher.stats.snapshot()["pending_images"] == 0


def test_a_follower_expires_on_its_own_deadline(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=64)
    blocker = start_held(batcher, runner, finished)
    leader = keyed(finished, request(10, 2))
    hurried = keyed(finished, request(10, 2), deadline_s=0.05)
    batcher.submit(leader)
    batcher.submit(hurried)
    time.sleep(0.1)
    runner.release.set()
    finished.wait(blocker, leader, hurried)

    assert_answered(leader)
    assert isinstance(hurried.error, DeadlineExceeded) and hurried.logits is None
    assert "shares with a request of the same view" in hurried.error.message
    assert batcher.stats.shared_images == 0


def test_followers_share_their_leaders_failure_and_shutdown(make_batcher, finished):
    runner = FakeRunner(poison=11.0)
    batcher = make_batcher(runner, max_batch_size=64)
    blocker = start_held(batcher, runner, finished)
    leader, follower = keyed(finished, request(10, 2)), keyed(finished, request(10, 2))
    batcher.submit(leader)
    batcher.submit(follower)
    runner.release.set()
    finished.wait(blocker, leader, follower)
    assert isinstance(follower.error, ModelFailure) and follower.error is leader.error

    blocker = start_held(batcher, runner, finished)
    queued, waiting = keyed(finished, request(20, 2)), keyed(finished, request(20, 2))
    batcher.submit(queued)
    batcher.submit(waiting)
    closing = threading.Thread(target=batcher.close, kwargs={"timeout_s": TIMEOUT_S})
    closing.start()
    finished.wait(queued, waiting)
    runner.release.set()
    closing.join()
    assert isinstance(waiting.error, NotReady) and waiting.error is queued.error


def test_view_key_depends_on_bytes_dtype_shape_and_mix() -> None:
    images = request(0, 4)
    key = view_key(images, None)
    assert view_key(images.clone(), None) == key
    assert view_key(images[:, :, :2].contiguous(), None) != key
    assert view_key(images.view(2, 2, *IMAGE_SHAPE).flatten(0, 1), None) == key
    assert view_key(images.double(), None) != key
    assert view_key(images.to(torch.bfloat16), None) != view_key(images.half(), None)
    assert view_key(images, Mix("mixup", (1, 0, 3, 2), lam=0.5)) != key
    changed = images.clone()
    changed[3, 2, 3, 3] += 1
    assert view_key(changed, None) != key
    assert view_key(images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), None) == key


def test_a_large_view_is_keyed_by_a_sample_and_shared_only_if_equal() -> None:
    """Above FULL_KEY_BYTES the key hashes a strided sample (cheap next to the request):
    views that differ only off the sample get one key, and still do not share a forward."""
    images = torch.randint(0, 256, (16, 3, 224, 224), dtype=torch.uint8)
    assert images.numel() > FULL_KEY_BYTES
    key = view_key(images, None)
    step = images.numel() // SAMPLE_BYTES
    unsampled, sampled = images.clone(), images.clone()
    unsampled.view(-1)[step // 2] ^= 1
    sampled.view(-1)[step] ^= 1
    assert view_key(unsampled, None) == key and view_key(sampled, None) != key
    leaders: InFlight[Any] = InFlight()
    lead = SimpleNamespace(images=images, mix=None, key=key)
    leaders.add(lead)
    assert leaders.leader_for(SimpleNamespace(images=images.clone(), mix=None, key=key)) is lead
    assert leaders.leader_for(SimpleNamespace(images=unsampled, mix=None, key=key)) is None


def test_a_pass_takes_the_clients_in_turn(make_batcher, finished):
    """A greedy client with four requests queued and a polite one with one: the next pass
    holds half of each, not the greedy client's two oldest requests."""
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=8)
    blocker = start_held(batcher, runner, finished)
    greedy = [finished.job(request(10 * (i + 1), 4)) for i in range(4)]
    polite = finished.job(request(100, 4))
    for job in greedy:
        job.client = "greedy"
    polite.client = "polite"
    for job in (*greedy, polite):
        batcher.submit(job)
    runner.release.set()
    finished.wait(blocker, *greedy, polite)

    assert runner.passes[1] == [10.0, 11.0, 12.0, 13.0, 100.0, 101.0, 102.0, 103.0]
    assert runner.passes[2:] == [
        [20.0, 21.0, 22.0, 23.0, 30.0, 31.0, 32.0, 33.0],
        [40.0, 41.0, 42.0, 43.0],
    ]
    for job in (*greedy, polite):
        assert_answered(job)
    assert polite.batch_sizes == [8]


def test_clients_share_a_pass_equally_and_split_requests_across_passes(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=6)
    blocker = start_held(batcher, runner, finished)
    jobs = {
        name: finished.job(request(first, 6)) for name, first in (("a", 10), ("b", 20), ("c", 30))
    }
    for name, job in jobs.items():
        job.client = name
        batcher.submit(job)
    runner.release.set()
    finished.wait(blocker, *jobs.values())

    assert runner.passes[1] == [10.0, 11.0, 20.0, 21.0, 30.0, 31.0]
    assert sorted(runner.sizes[1:]) == [6, 6, 6]
    for job in jobs.values():
        assert_answered(job)
        assert job.batch_sizes == [6, 6, 6]


def test_a_full_queue_makes_room_for_a_client_under_its_share(make_batcher, finished):
    """The greedy client fills the queue; the polite one's request pushes out the greedy
    client's newest (QueueFull, so it retries) but only up to the polite client's share."""
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=16, max_queue_images=8)
    blocker = start_held(batcher, runner, finished)
    greedy = [finished.job(request(10 * (i + 1), 4)) for i in range(2)]
    polite = [finished.job(request(100, 2)), finished.job(request(200, 4))]
    for job in greedy:
        job.client = "greedy"
        batcher.submit(job)
    for job in polite:
        job.client = "polite"

    batcher.submit(polite[0])
    finished.wait(greedy[1])
    assert isinstance(greedy[1].error, QueueFull)
    assert "made room for another client's" in greedy[1].error.message
    assert greedy[1].error.retry_after_s is not None
    assert batcher.stats.snapshot()["pending_images"] == 6
    with pytest.raises(QueueFull, match="6 images queued"):
        batcher.submit(polite[1])  # 2 + 4 images would be over its share of 8 between two
    again = finished.job(request(30, 4))
    again.client = "greedy"
    with pytest.raises(QueueFull, match="6 images queued"):
        batcher.submit(again)  # at its share: nobody is pushed out for it
    runner.release.set()
    finished.wait(blocker, greedy[0], polite[0])

    assert runner.passes[1] == [10.0, 11.0, 12.0, 13.0, 100.0, 101.0]
    assert_answered(greedy[0])
    assert_answered(polite[0])


def test_started_or_followed_requests_are_never_pushed_out(make_batcher, finished):
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=16, max_queue_images=4)
    blocker = start_held(batcher, runner, finished)
    led = keyed(finished, request(10, 4))
    follower = keyed(finished, request(10, 4))
    for job in (led, follower):
        job.client = "greedy"
        batcher.submit(job)
    polite = finished.job(request(100, 1))
    polite.client = "polite"

    with pytest.raises(QueueFull, match="4 images queued"):
        batcher.submit(polite)
    runner.release.set()
    finished.wait(blocker, led, follower)
    assert_answered(led)
    assert_answered(follower)


def test_clients_left_out_of_a_full_pass_go_first_in_the_next(make_batcher, finished):
    """More clients than a pass has room for: the next pass takes the ones left out, so
    every client is served every other pass rather than the first four always."""
    runner = FakeRunner()
    batcher = make_batcher(runner, max_batch_size=4)
    blocker = start_held(batcher, runner, finished)
    jobs = [finished.job(request(10 * (i + 1), 4)) for i in range(8)]
    for i, job in enumerate(jobs):
        job.client = f"student-{i}"
        batcher.submit(job)
    runner.release.set()
    finished.wait(blocker, *jobs)

    firsts = [[int(v) // 10 for v in ids] for ids in runner.passes[1:]]
    assert firsts[:2] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert firsts[2:4] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    for job in jobs:
        assert_answered(job)
