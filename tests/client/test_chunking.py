"""Splitting a batch over the message limit and joining the answers: the one request-id check."""

from __future__ import annotations

import pytest
import torch

from teacher_server.client.chunking import join_parts, split_request
from teacher_server.shared.contract import InferRequest, InferResult, Mix
from teacher_server.shared.errors import TeacherError
from tests.helpers import random_images

PIXELS = 3 * 8 * 8


def request(n: int, mix: Mix | None = None) -> InferRequest:
    return InferRequest("m", random_images(n, 8), mix=mix, request_id="call")


def answer(part: InferRequest, rows: int | None = None) -> InferResult:
    """Row i of the answer holds the first pixel of image i (so rows can be traced)."""
    count = part.images.shape[0] if rows is None else rows
    logits = part.images[:count, 0, 0, :1].float().repeat(1, 10)
    return InferResult(model="m", request_id=part.request_id, logits=logits)


def test_a_request_that_fits_is_sent_whole() -> None:
    whole = request(10)
    [part] = split_request(whole, 10 * PIXELS + 4096)
    assert part.request is whole and part.rows == 10


def test_parts_fit_the_limit_and_join_back_in_order() -> None:
    whole = request(10)
    parts = split_request(whole, 3 * PIXELS + 4096)
    assert [p.rows for p in parts] == [3, 3, 3, 1]
    assert [p.request.request_id for p in parts] == [f"call/{i}" for i in range(4)]
    reply = join_parts("call", parts, [answer(p.request) for p in parts])
    assert reply.logits is not None
    assert torch.equal(reply.logits[:, 0], whole.images[:, 0, 0, 0].float())
    assert len(reply.parts) == 4


def test_each_part_carries_its_rows_mix_partners() -> None:
    perm = (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
    whole = request(10, Mix("mixup", perm, lam=0.3))
    parts = split_request(whole, 6 * PIXELS + 4096)  # 3 rows per part with their partners
    for part in parts:
        mix = part.request.mix
        assert mix is not None and mix.lam == 0.3
        for row, partner in enumerate(mix.perm[: part.rows]):
            original = torch.nonzero((whole.images == part.request.images[row]).all(dim=(1, 2, 3)))
            expected_partner = whole.images[perm[int(original[0])]]
            assert torch.equal(part.request.images[partner], expected_partner)


def test_an_answer_to_another_request_is_refused() -> None:
    [part] = split_request(request(2), 10**6)
    wrong = InferResult(model="m", request_id="someone-else", logits=torch.zeros(2, 10))
    with pytest.raises(TeacherError, match="expected 'call'"):
        join_parts("call", [part], [wrong])


def test_an_answer_missing_rows_is_refused() -> None:
    [part] = split_request(request(4), 10**6)
    with pytest.raises(TeacherError, match="has 3 rows, expected 4"):
        join_parts("call", [part], [answer(part.request, rows=3)])
