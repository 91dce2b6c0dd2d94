"""Hide the teacher's round trip: keep K teacher requests in flight ahead of the training step.

Items come out in the order they went in, each with its own answer (the client checks the
request ids); depth 0 fetches inline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

Item = TypeVar("Item")


class Prefetcher(Generic[Item]):
    """Runs `fetch(item)` for up to `depth` items ahead, in worker threads; yields in order."""

    def __init__(self, fetch: Callable[[Item], torch.Tensor], depth: int = 3) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.fetch = fetch
        self.depth = depth

    def __call__(self, items: Iterable[Item]) -> Iterator[tuple[Item, torch.Tensor]]:
        if self.depth == 0:
            for item in items:
                yield item, self.fetch(item)
            return
        pending: deque[tuple[Item, Future[torch.Tensor]]] = deque()
        source = iter(items)
        with ThreadPoolExecutor(self.depth, thread_name_prefix="kdserve-prefetch") as pool:
            try:
                for item in source:
                    pending.append((item, pool.submit(self.fetch, item)))
                    if len(pending) > self.depth:
                        done, future = pending.popleft()
                        yield done, future.result()
                while pending:
                    done, future = pending.popleft()
                    yield done, future.result()
            finally:
                for _, future in pending:
                    future.cancel()
