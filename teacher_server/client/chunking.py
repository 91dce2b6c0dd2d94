"""Batches over the server's request limits (bytes, images): split into requests, answers
joined in order.

The server mixes a request as a whole, so each part carries every image its rows mix with
(re-indexed); those extra rows are answered too and dropped here. Every part's answer must
carry its own request id and at least its rows: the one place answers are checked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from teacher_server.shared.contract import InferRequest, InferResult, Mix
from teacher_server.shared.errors import TeacherError

REQUEST_OVERHEAD_BYTES = 4096
"""Room left in each part for everything but the pixels (fields, framing)."""


@dataclass(frozen=True)
class Part:
    """One wire request of a call, answering the first `rows` of its images."""

    request: InferRequest
    rows: int


@dataclass(frozen=True)
class TeacherReply:
    """One call's answer: the rows of every part joined in order, and each part's result."""

    request_id: str
    logits: torch.Tensor | None
    top_k_values: torch.Tensor | None
    top_k_indices: torch.Tensor | None
    parts: tuple[InferResult, ...]


def split_request(request: InferRequest, limit_bytes: int, limit_images: int = 0) -> list[Part]:
    """Parts of at most `limit_bytes` and `limit_images` (0: any number) each; the whole
    request when it fits."""
    spans = _spans(request, limit_bytes, limit_images)
    if len(spans) == 1:
        return [Part(request, int(request.images.shape[0]))]
    parts = []
    for index, (start, stop) in enumerate(spans):
        images, mix = _rows_with_partners(request.images, request.mix, start, stop)
        sub = replace(request, images=images, mix=mix, request_id=f"{request.request_id}/{index}")
        parts.append(Part(sub, stop - start))
    return parts


def join_parts(request_id: str, parts: list[Part], results: list[InferResult]) -> TeacherReply:
    """Check each answer against its part, keep the part's own rows, join them in order."""
    full, values, indices = [], [], []
    for part, result in zip(parts, results, strict=True):
        expected = part.request.request_id
        if result.request_id != expected:
            raise TeacherError(
                f"answer carries request_id {result.request_id!r}, expected {expected!r}"
            )
        answered = result.logits if result.logits is not None else result.top_k_values
        if answered is None or answered.shape[0] < part.rows:
            rows = None if answered is None else int(answered.shape[0])
            raise TeacherError(f"answer to {expected!r} has {rows} rows, expected {part.rows}")
        if result.logits is not None:
            full.append(result.logits[: part.rows])
        if result.top_k_values is not None and result.top_k_indices is not None:
            values.append(result.top_k_values[: part.rows])
            indices.append(result.top_k_indices[: part.rows])
    return TeacherReply(
        request_id=request_id,
        logits=_joined(full),
        top_k_values=_joined(values),
        top_k_indices=_joined(indices),
        parts=tuple(results),
    )


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor | None:
    if not pieces:
        return None
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _spans(request: InferRequest, limit_bytes: int, limit_images: int) -> list[tuple[int, int]]:
    """Row ranges whose requests fit the limits; with mixing, each part carries its partners."""
    images, mix = request.images, request.mix
    count = int(images.shape[0])
    per_image = images[0].numel() * images.element_size() + (16 if mix is not None else 0)
    fits = max(1, (limit_bytes - REQUEST_OVERHEAD_BYTES) // per_image)
    if limit_images:
        fits = min(fits, limit_images)
    if mix is not None:
        fits = max(1, fits // 2)
    if fits >= count:
        return [(0, count)]
    return [(start, min(count, start + fits)) for start in range(0, count, fits)]


def _rows_with_partners(
    images: torch.Tensor, mix: Mix | None, start: int, stop: int
) -> tuple[torch.Tensor, Mix | None]:
    """Rows start:stop, plus the mix partners outside them, with the mix re-indexed to match."""
    if mix is None:
        return images[start:stop], None
    rows = list(range(start, stop))
    extra = sorted({mix.perm[i] for i in rows} - set(rows))
    position = {row: i for i, row in enumerate(rows + extra)}
    perm = tuple(position[mix.perm[i]] for i in rows) + tuple(
        range(len(rows), len(rows) + len(extra))
    )
    return images[rows + extra], Mix(mix.mode, perm, lam=mix.lam, box=mix.box)
