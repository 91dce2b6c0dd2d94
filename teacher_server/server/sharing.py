"""One forward for identical views in flight: requests for one model that carry the same view
bytes and mix parameters (a seed or hyper-parameter sweep of students on one data order) are
computed once and each is answered.

The key is a hash of the view's dtype, shape and mix and of its bytes (of all of them up to
FULL_KEY_BYTES, of an evenly strided sample of SAMPLE_BYTES above: hashing a whole 2.4 MB view
cost the server about a millisecond per request); two requests share only if their views and
mixes are also equal, byte for byte (a key that matches for other bytes computes both). Only
requests queued or computing are matched, never answered ones: there is no cache to grow or
go stale.
"""

from __future__ import annotations

import hashlib
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

from teacher_server.shared.contract import Mix

FULL_KEY_BYTES = 1 << 16
SAMPLE_BYTES = 1 << 15


def view_key(images: torch.Tensor, mix: Mix | None) -> bytes:
    """A digest of what a model computes from this request: the view's dtype, shape, mix and
    bytes (a strided sample of a large view's: `same_view` settles a match)."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"{images.dtype}{tuple(images.shape)}{mix!r}".encode())
    if images.numel():
        data = images.contiguous().view(torch.uint8).numpy().reshape(-1)
        if data.size > FULL_KEY_BYTES:
            data = np.ascontiguousarray(data[:: data.size // SAMPLE_BYTES])
        digest.update(data.data)
    return digest.digest()


class Shareable(Protocol):
    """What a queued request shows the sharing (the batcher's `Job`)."""

    images: torch.Tensor
    mix: Mix | None
    key: bytes | None


def same_view(a: Shareable, b: Shareable) -> bool:
    """The equality check behind a matching key."""
    return (
        a.images.dtype == b.images.dtype
        and a.images.shape == b.images.shape
        and a.mix == b.mix
        and torch.equal(a.images, b.images)
    )


J = TypeVar("J", bound=Shareable)


class InFlight(Generic[J]):
    """The requests of one model that lead a forward, by key (not thread-safe: the batcher's
    lock guards it)."""

    def __init__(self) -> None:
        self._leaders: dict[bytes, list[J]] = {}

    def leader_for(self, job: J) -> J | None:
        """The request in flight computing the same view as `job`, if any."""
        if job.key is None:
            return None
        return next((lead for lead in self._leaders.get(job.key, ()) if same_view(lead, job)), None)

    def add(self, job: J) -> None:
        if job.key is not None:
            self._leaders.setdefault(job.key, []).append(job)

    def remove(self, job: J) -> None:
        if job.key is None:
            return
        leaders = self._leaders.get(job.key, [])
        if job in leaders:
            leaders.remove(job)
            if not leaders:
                del self._leaders[job.key]
