"""Serving statistics per model, shown as JSON (`GET /v1/stats`) and Prometheus (`GET /metrics`).

The set follows Triton's: inference count vs execution count (mean batch size), queue and
compute time, pending images, requests by outcome, and the images answered without a forward
of their own (shared with a request of the same view). An ensemble adds each member's latency
and failures by reason, and its answers combined from fewer members than all (a quorum).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, buckets = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            buckets.append((bound, float(running)))
        return buckets


class ModelStats:
    """Counters of one served model; thread-safe (batcher workers and the event loop write)."""

    def __init__(
        self,
        name: str,
        pending_images: Callable[[], int] = lambda: 0,
        *,
        members: Iterable[str] = (),
    ) -> None:
        self.name = name
        self._pending_images = pending_images
        self._lock = threading.Lock()
        self._member_hist = {member: _Histogram(SECONDS_BUCKETS) for member in members}
        self._member_failures: dict[str, Counter[str]] = {m: Counter() for m in self._member_hist}
        self.partial_answers = 0
        self.shared_images = 0
        self.outcomes: Counter[str] = Counter()
        self.images = 0
        self.executions = 0
        self.executed_images = 0
        self.padding_images = 0
        self.batch_sizes: Counter[int] = Counter()
        self._batch_hist = _Histogram(BATCH_BUCKETS)
        self._queue_hist = _Histogram(SECONDS_BUCKETS)
        self._compute_hist = _Histogram(SECONDS_BUCKETS)

    def record_outcome(self, outcome: str, images: int = 0) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if outcome == "ok":
                self.images += images

    def record_queue(self, seconds: float) -> None:
        with self._lock:
            self._queue_hist.observe(seconds)

    def record_execution(self, batch_size: int, seconds: float, computed_rows: int = 0) -> None:
        """A pass of `batch_size` images, padded to `computed_rows` (`pass_sizes`) if larger."""
        with self._lock:
            self.executions += 1
            self.executed_images += batch_size
            self.padding_images += max(0, computed_rows - batch_size)
            self.batch_sizes[batch_size] += 1
            self._batch_hist.observe(batch_size)
            self._compute_hist.observe(seconds)

    def record_shared(self, images: int) -> None:
        """`images` were answered from a forward computed for another request of the same view."""
        with self._lock:
            self.shared_images += images

    def record_member(self, member: str, seconds: float, failure: str | None = None) -> None:
        """An ensemble member answered (or failed with the error named `failure`) in `seconds`."""
        with self._lock:
            self._member_hist[member].observe(seconds)
            if failure is not None:
                self._member_failures[member][failure] += 1

    def record_partial_answer(self) -> None:
        """An ensemble answered from fewer members than all (its quorum allowed it)."""
        with self._lock:
            self.partial_answers += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            members = {
                member: {
                    "requests": sum(hist.counts),
                    "seconds_total": hist.total,
                    "failures": dict(self._member_failures[member]),
                }
                for member, hist in self._member_hist.items()
            }
            extra = {"members": members, "partial_answers": self.partial_answers} if members else {}
            return {
                "requests": dict(self.outcomes),
                "images": self.images,
                "executions": self.executions,
                "executed_images": self.executed_images,
                "padding_images": self.padding_images,
                "mean_batch_size": self.executed_images / self.executions
                if self.executions
                else 0.0,
                "max_batch_size": max(self.batch_sizes, default=0),
                "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "queue_seconds_total": self._queue_hist.total,
                "compute_seconds_total": self._compute_hist.total,
                "pending_images": self._pending_images(),
                "shared_images": self.shared_images,
                **extra,
            }

    def metrics(self) -> Iterator[tuple[str, Metric]]:
        with self._lock:
            yield (
                "executions",
                self._counter("executions", "forward passes (batches)", self.executions),
            )
            yield "images", self._counter("inference_images", "images answered", self.images)
            yield (
                "shared",
                self._counter(
                    "shared_images",
                    "images answered from a forward computed for a request of the same view",
                    self.shared_images,
                ),
            )
            yield (
                "padding",
                self._counter(
                    "padding_images",
                    "rows computed only to pad a pass to one of the model's pass_sizes",
                    self.padding_images,
                ),
            )
            yield (
                "batch",
                self._histogram("batch_size", "images per forward pass", self._batch_hist),
            )
            yield (
                "queue",
                self._histogram(
                    "queue_seconds", "time from enqueue to first forward", self._queue_hist
                ),
            )
            yield (
                "compute",
                self._histogram("compute_seconds", "forward pass time", self._compute_hist),
            )
            requests = CounterMetricFamily(
                "kdserve_inference_requests", "requests by outcome", labels=["model", "outcome"]
            )
            for outcome, count in sorted(self.outcomes.items()):
                requests.add_metric([self.name, outcome], count)
            yield "requests", requests
            if self._member_hist:
                yield from self._member_metrics()
        pending = GaugeMetricFamily(
            "kdserve_pending_images", "images waiting in the queue", labels=["model"]
        )
        pending.add_metric([self.name], self._pending_images())
        yield "pending", pending

    def _member_metrics(self) -> Iterator[tuple[str, Metric]]:
        """An ensemble's members (called with the lock held)."""
        seconds = HistogramMetricFamily(
            "kdserve_member_seconds",
            "time from asking an ensemble member to its answer or failure",
            labels=["model", "member"],
        )
        failures = CounterMetricFamily(
            "kdserve_member_failures",
            "ensemble member failures by reason (the outcome names of kdserve_inference_requests)",
            labels=["model", "member", "reason"],
        )
        for member, hist in self._member_hist.items():
            seconds.add_metric([self.name, member], hist.cumulative(), sum_value=hist.total)
            for reason, count in sorted(self._member_failures[member].items()):
                failures.add_metric([self.name, member, reason], count)
        yield "member_seconds", seconds
        yield "member_failures", failures
        yield (
            "partial",
            self._counter(
                "ensemble_partial_answers",
                "ensemble answers combined from fewer members than all (quorum)",
                self.partial_answers,
            ),
        )

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(f"kdserve_{name}", doc, labels=["model"])
        family.add_metric([self.name], value)
        return family

    def _histogram(self, name: str, doc: str, hist: _Histogram) -> HistogramMetricFamily:
        family = HistogramMetricFamily(f"kdserve_{name}", doc, labels=["model"])
        family.add_metric([self.name], hist.cumulative(), sum_value=hist.total)
        return family


class StatsCollector(Collector):
    """Prometheus view of every model's stats; metrics of one name are merged across models."""

    def __init__(self, models: Callable[[], Iterable[ModelStats]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for stats in self._models():
            for key, family in stats.metrics():
                if key in merged:
                    merged[key].samples.extend(family.samples)
                else:
                    merged[key] = family
        yield from merged.values()
