"""The framed HTTP body and the in-place read of a protobuf request's images.

Both read a request's images where they lie in the received bytes instead of copying them out
of a msgpack or protobuf parse; each must decode exactly what the plain encoding decodes, and
refuse a malformed body with a precise InvalidRequest (a malformed answer: TeacherError).
"""

from __future__ import annotations

import struct
from unittest import mock

import msgpack
import numpy
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from teacher_server.shared import wire
from teacher_server.shared._proto import teacher_pb2 as pb
from teacher_server.shared.contract import InferRequest, InferResult, Mix, Timings
from teacher_server.shared.errors import InvalidRequest, TeacherError


def request(count: int = 4, side: int = 8, **fields: object) -> InferRequest:
    generator = torch.Generator().manual_seed(count * 1000 + side)
    images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=generator)
    return InferRequest(model="small", images=images, **fields)  # type: ignore[arg-type]


def joined(pieces: list[bytes | memoryview]) -> bytes:
    return b"".join(pieces)


def inside(tensor: torch.Tensor, body: bytes) -> bool:
    """Whether the tensor's memory lies in `body` (it was not copied out)."""
    address = numpy.frombuffer(body, dtype=numpy.uint8).ctypes.data
    return address <= tensor.data_ptr() < address + len(body)


def assert_same_request(a: InferRequest, b: InferRequest) -> None:
    assert torch.equal(a.images, b.images) and a.images.dtype == b.images.dtype
    for field in ("model", "mix", "temperature", "output", "output_dtype", "top_k"):
        assert getattr(a, field) == getattr(b, field), field
    assert (a.request_id, a.client_id) == (b.request_id, b.client_id)


def test_a_framed_request_decodes_as_its_msgpack_body_and_views_the_body() -> None:
    sent = request(mix=Mix("mixup", (1, 0, 3, 2), lam=0.25), top_k=3, request_id="r", client_id="c")
    body = joined(wire.request_to_framed(sent))
    framed = wire.request_from_framed(body, path_model="small")
    assert_same_request(framed, wire.request_from_msgpack(wire.request_to_msgpack(sent)))
    assert_same_request(framed, sent)
    assert inside(framed.images, body)
    packed = wire.request_to_msgpack(sent)
    assert not inside(wire.request_from_msgpack(packed).images, packed)  # msgpack copies
    header_length = struct.unpack_from("<I", body)[0]
    assert len(body) == 4 + header_length + sent.images.numel()
    assert "data" not in msgpack.unpackb(body[4 : 4 + header_length])["images"]


def test_a_framed_result_round_trips_every_tensor() -> None:
    logits = torch.randn(3, 10).to(torch.float16)
    values, indices = torch.topk(logits.float(), 2)
    timings = Timings(1.5, 2.5, 4.0, (3,))
    for result in (
        InferResult("m", "id", logits=logits, timings=timings, members=("a", "b")),
        InferResult("m", "id", top_k_values=values, top_k_indices=indices.int(), timings=timings),
    ):
        back = wire.result_from_framed(joined(wire.result_to_framed(result)))
        assert (back.model, back.request_id, back.timings, back.members) == (
            result.model,
            result.request_id,
            result.timings,
            result.members,
        )
        for name in wire.RESULT_TENSORS:
            sent, got = getattr(result, name), getattr(back, name)
            assert (sent is None and got is None) or torch.equal(sent, got), name


def framed(header: object, tail: bytes = b"", length: int | None = None) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(packed) if length is None else length) + packed + tail


IMAGES_HEAD = {"dtype": "uint8", "shape": [1, 3, 2, 2]}
MALFORMED_REQUESTS = [
    (b"\x01\x00", "starts with a 4-byte header length; got 2 bytes"),
    (framed({"images": IMAGES_HEAD}, length=999), "header length 999 runs past"),
    (framed({"images": IMAGES_HEAD}, b"\x00" * 11), "images.data has 11 bytes but shape"),
    (framed({"images": IMAGES_HEAD}, b"\x00" * 13), "images.data has 13 bytes but shape"),
    (framed({"images": {**IMAGES_HEAD, "data": b"\x00" * 12}}), "images has unknown fields"),
    (framed([1, 2]), "header must be a map"),
    (framed({}, b"\x00" * 12), "images is required"),
    (struct.pack("<I", 3) + b"\xc1\xc1\xc1", "not valid msgpack"),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED_REQUESTS)
def test_a_malformed_framed_request_is_invalid(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")) as caught:
        wire.request_from_framed(body, path_model="small")
    assert caught.value.model == "small"


def test_a_malformed_framed_answer_is_a_teacher_error() -> None:
    logits = {"dtype": "float16", "shape": [2, 3]}
    for body, message in [
        (b"", "header length"),
        (framed({"logits": logits}, b"\x00" * 11), "logits.data has 11 bytes"),
        (framed({"logits": logits}, b"\x00" * 13), "13 tensor bytes follow the header"),
        (framed({"logits": {"dtype": "int64", "shape": [2]}}), "logits has dtype 'int64'"),
    ]:
        with pytest.raises(TeacherError, match=message):
            wire.result_from_framed(body)


# ---- protobuf: the images read in place ----------------------------------------------------

requests = st.builds(
    request,
    count=st.integers(1, 6),
    side=st.integers(1, 9),
    temperature=st.sampled_from([1.0, 0.5, 4.0]),
    top_k=st.one_of(st.none(), st.integers(1, 5)),
    request_id=st.text(max_size=5),
    client_id=st.text(max_size=5),
)


@settings(max_examples=60, deadline=None)
@given(sent=requests)
def test_protobuf_images_are_read_in_place_whatever_the_field_order(sent: InferRequest) -> None:
    ours = wire.request_to_protobuf(sent)  # images last
    theirs = pb.InferRequest.FromString(ours).SerializeToString()  # protobuf's order
    for body in (ours, theirs):
        got = wire.request_from_protobuf(body)
        assert_same_request(got, sent)
        assert inside(got.images, body)


def test_protobuf_repeated_images_are_merged_as_protobuf_merges_them() -> None:
    """A second images field without dtype and shape replaces the data (the last one wins),
    so the in-place read steps aside and the whole message is parsed."""
    sent = request(count=2, side=4)
    other = torch.zeros_like(sent.images)
    second = pb.Tensor(data=other.numpy().tobytes()).SerializeToString()
    body = wire.request_to_protobuf(sent) + b"\x12" + bytes([len(second)]) + second
    assert torch.equal(wire.request_from_protobuf(body).images, other)


def parsed_whole(body: bytes) -> InferRequest | str:
    """The request protobuf's own parse of the whole message gives (the reference), or the
    error's class name."""
    with mock.patch.object(wire, "_split_images", return_value=None):
        return outcome(body)


def outcome(body: bytes) -> InferRequest | str:
    try:
        return wire.request_from_protobuf(body)
    except TeacherError as error:
        return type(error).__name__


edits = st.lists(
    st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


FRAGMENTS = [
    pb.InferRequest(images=pb.Tensor(data=bytes(range(48)))).SerializeToString(),
    pb.InferRequest(images=pb.Tensor(dtype="uint8")).SerializeToString(),
    pb.InferRequest(images=pb.Tensor(shape=[1, 3, 4, 4])).SerializeToString(),
    pb.InferRequest(model="other", temperature=2.0).SerializeToString(),
    b"\x50\x01",  # an unknown varint field
    b"\x12\x02\x50\x01",  # images holding an unknown field
]
"""Whole fields to put before or after a message: protobuf merges repeated fields (the last
scalar wins, sub-messages merge), which the in-place read must leave to protobuf."""


@settings(max_examples=300, deadline=None)
@given(
    sent=requests,
    edits=st.one_of(st.just([]), edits),
    cut=st.one_of(st.none(), st.integers(0)),
    before=st.lists(st.sampled_from(FRAGMENTS), max_size=2),
    after=st.lists(st.sampled_from(FRAGMENTS), max_size=2),
)
def test_the_in_place_read_decodes_mutated_bytes_as_the_whole_parse_does(
    sent: InferRequest,
    edits: list[tuple[str, int, int]],
    cut: int | None,
    before: list[bytes],
    after: list[bytes],
) -> None:
    """Bytes flipped, inserted, deleted or cut anywhere in a real message, whole fields
    repeated before or after it: the in-place read answers what protobuf's parse of the whole
    message answers (the same request or the same refusal)."""
    body = bytearray(b"".join([*before, wire.request_to_protobuf(sent), *after]))
    for kind, where, value in edits:
        where %= len(body) + (kind == "insert")
        if kind == "set" and body:
            body[where] = value
        elif kind == "insert":
            body.insert(where, value)
        elif body:
            del body[where]
    if cut is not None and body:
        del body[cut % len(body) :]
    got, expected = outcome(bytes(body)), parsed_whole(bytes(body))
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected
    else:
        assert_same_request(got, expected)


@pytest.mark.parametrize(
    "body",
    [
        b"\x12\x05abc",  # images longer than the message
        b"\x12\x03\x1a\x09ab",  # data longer than images
        b"\x12\x02\x1a\x00\x0f",  # wire type 7 after the images
        b"\x02",  # field number 0
        b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint over 10 bytes
    ],
)
def test_malformed_protobuf_is_invalid_with_or_without_the_in_place_read(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        wire.request_from_protobuf(body)


def test_the_in_place_read_refuses_what_protobuf_refuses_and_leaves_long_messages_to_it() -> None:
    overlong_key = bytes.fromhex("928080808000120a0575696e74381204010301011a03616263")
    with pytest.raises(DecodeError):
        pb.InferRequest.FromString(overlong_key)
    assert wire._split_images(memoryview(overlong_key)) is None
    with pytest.raises(InvalidRequest, match="not a valid InferRequest"):
        wire.request_from_protobuf(overlong_key)
    sent = request(count=2, side=4)
    padded = wire.request_to_protobuf(sent) + b"\x50\x00" * 100_000  # unknown fields
    assert wire._split_images(memoryview(padded)) is None
    assert_same_request(wire.request_from_protobuf(padded), sent)
