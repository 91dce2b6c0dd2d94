"""The wire contract and its two encodings: exact tensors, round trips, one validation for both."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import msgpack
import pytest
import torch

from teacher_server.shared import wire
from teacher_server.shared._proto import teacher_pb2 as pb
from teacher_server.shared.contract import (
    InferRequest,
    InferResult,
    Mix,
    ModelInfo,
    ModelList,
    ServerLimits,
    Timings,
)
from teacher_server.shared.errors import InvalidRequest, TeacherError
from tests.helpers import protobuf_request, random_images, tensor_map

ENCODINGS = {
    "msgpack": (wire.request_to_msgpack, wire.request_from_msgpack),
    "protobuf": (wire.request_to_protobuf, wire.request_from_protobuf),
}
RESULT_ENCODINGS = {
    "msgpack": (wire.result_to_msgpack, wire.result_from_msgpack),
    "protobuf": (wire.result_to_protobuf, wire.result_from_protobuf),
}


@pytest.mark.parametrize("encoding", RESULT_ENCODINGS)
@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int32], ids=str
)
def test_tensors_travel_exactly(dtype: torch.dtype, encoding: str) -> None:
    encode, decode = RESULT_ENCODINGS[encoding]
    tensor = (torch.rand(2, 3, 5, 4) * 100).to(dtype)
    back = decode(encode(InferResult("m", "r", logits=tensor))).logits
    assert back is not None and back.dtype == dtype and torch.equal(back, tensor)


def test_wire_bytes_are_little_endian_c_order() -> None:
    transposed = torch.tensor([[1.0, 2.0]], dtype=torch.float32).t()
    fields = msgpack.unpackb(wire.result_to_msgpack(InferResult("m", "r", logits=transposed)))
    assert fields["logits"]["shape"] == [2, 1]
    assert fields["logits"]["data"] == b"\x00\x00\x80\x3f\x00\x00\x00\x40"


def test_uint8_view_wire_size_is_the_pixels() -> None:
    images = torch.zeros(16, 3, 224, 224, dtype=torch.uint8)
    message = pb.InferRequest.FromString(wire.request_to_protobuf(InferRequest("m", images)))
    assert len(message.images.data) == 16 * 3 * 224 * 224


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "mix",
    [None, Mix("mixup", (2, 0, 1), lam=0.25), Mix.cutmix((1, 2, 0), (2, 3, 6, 8), 8, 8)],
    ids=["plain", "mixup", "cutmix"],
)
def test_requests_round_trip(encoding: str, mix: Mix | None) -> None:
    encode, decode = ENCODINGS[encoding]
    request = InferRequest(
        model="teacher",
        images=random_images(3, 8),
        mix=mix,
        temperature=4.0,
        output="log_probs",
        output_dtype="float16",
        top_k=2,
        request_id="run/7",
        client_id="sweep-lr0.1",
    )
    back = decode(encode(request))
    assert torch.equal(back.images, request.images)
    assert back.mix == request.mix
    assert (back.model, back.temperature, back.output, back.output_dtype) == (
        "teacher",
        4.0,
        "log_probs",
        "float16",
    )
    assert (back.top_k, back.request_id, back.client_id) == (2, "run/7", "sweep-lr0.1")


@pytest.mark.parametrize("encoding", RESULT_ENCODINGS)
def test_results_round_trip(encoding: str) -> None:
    encode, decode = RESULT_ENCODINGS[encoding]
    result = InferResult(
        model="pair",
        request_id="r",
        top_k_values=torch.rand(4, 3).half(),
        top_k_indices=torch.randint(0, 10, (4, 3), dtype=torch.int32),
        timings=Timings(queue_ms=1.5, compute_ms=2.5, total_ms=5.0, batch_sizes=(64, 4)),
        members=("small", "grpc://far:50051/wide"),
    )
    back = decode(encode(result))
    assert back.logits is None and back.timings == result.timings
    assert back.top_k_values is not None and torch.equal(back.top_k_values, result.top_k_values)
    assert back.top_k_indices is not None and torch.equal(back.top_k_indices, result.top_k_indices)
    assert (back.model, back.request_id, back.members) == ("pair", "r", result.members)


def test_protobuf_encoding_is_the_messages_own() -> None:
    """Our spliced tensor field parses as protobuf's own encoding of the same message."""
    logits = torch.randn(4, 10)
    encoded = wire.result_to_protobuf(
        InferResult("m", "x", logits=logits, timings=Timings(1.0, 2.0, 3.0, (4,)))
    )
    expected = pb.InferResponse(
        model="m",
        request_id="x",
        logits=pb.Tensor(dtype="float32", shape=[4, 10], data=logits.numpy().tobytes()),
        timings=pb.Timings(queue_ms=1.0, compute_ms=2.0, total_ms=3.0, batch_sizes=[4]),
    )
    assert pb.InferResponse.FromString(encoded) == expected


def test_a_grpc_answer_holds_its_logits_bytes_once() -> None:
    """Encoding a big answer allocates about its own size: the logits are not copied first."""
    logits = torch.randn(512, 4096)  # 8 MiB
    result = InferResult("m", "x", logits=logits)
    tracemalloc.start()
    try:
        encoded = wire.result_to_protobuf(result)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(encoded) > logits.numel() * 4
    assert peak < 1.2 * len(encoded), f"peak {peak} bytes for a {len(encoded)}-byte answer"


def test_model_lists_round_trip() -> None:
    listed = ModelList(
        models=(
            ModelInfo("a", "model", 10, (32, 32), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), "float16"),
            ModelInfo(
                "pair", "ensemble", 10, (40, 40), (), (), "", ("a", "b"), "mean_probs", (1.0, 3.0)
            ),
        ),
        limits=ServerLimits(max_request_bytes=1024, max_batch_size=64, max_queue_images=128),
    )
    assert wire.models_from_map(wire.models_to_map(listed)) == listed
    assert wire.models_from_protobuf(wire.models_to_protobuf(listed)) == listed


def test_defaults_and_the_urls_model() -> None:
    body = msgpack.packb({"images": tensor_map(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))})
    request = wire.request_from_msgpack(body, path_model="t")
    assert (request.model, request.temperature, request.output, request.output_dtype) == (
        "t",
        1.0,
        "logits",
        "float32",
    )
    assert request.top_k is None and request.mix is None and request.request_id == ""
    with pytest.raises(InvalidRequest, match="differs from the URL's model"):
        wire.request_from_msgpack(
            msgpack.packb({"model": "u", **msgpack.unpackb(body)}), path_model="t"
        )


def test_cutmix_label_weight_is_the_kept_area() -> None:
    fields = {
        "model": "t",
        "images": tensor_map(torch.zeros(2, 3, 10, 20, dtype=torch.uint8)),
        "mix": {"mode": "cutmix", "perm": [1, 0], "box": [0, 0, 5, 10]},
    }
    for request in (
        wire.request_from_msgpack(msgpack.packb(fields)),
        wire.request_from_protobuf(protobuf_request(fields)),
    ):
        assert request.mix is not None and request.mix.box == (0, 0, 5, 10)
        assert request.mix.lam == pytest.approx(1 - 50 / 200)


def _fields(**changes: Any) -> dict[str, Any]:
    return {
        "model": "t",
        "images": tensor_map(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)),
        **changes,
    }


SAME_ON_BOTH = {
    "zero temperature": _fields(temperature=0.0),
    "infinite temperature": _fields(temperature=math.inf),
    "empty model": _fields(model=""),
    "no model": {"images": _fields()["images"]},
    "empty output": _fields(output=""),
    "bad output dtype": _fields(output_dtype="int8"),
    "zero top_k": _fields(top_k=0),
    "long request id": _fields(request_id="x" * 257),
    "long client id": _fields(client_id="x" * 257),
    "no images": {"model": "t"},
    "bad dtype": _fields(images={**tensor_map(torch.zeros(2, 3, 4, 4)), "dtype": "int64"}),
    "negative shape": _fields(images={"dtype": "uint8", "shape": [-1, 3, 4, 4], "data": b""}),
    "short data": _fields(images={"dtype": "uint8", "shape": [2, 3, 4, 4], "data": b"\x00"}),
    "mixup without lam": _fields(mix={"mode": "mixup", "perm": [1, 0]}),
    "cutmix without box": _fields(mix={"mode": "cutmix", "perm": [1, 0]}),
    "short perm": _fields(mix={"mode": "mixup", "perm": [1], "lam": 0.5}),
    "unknown mode": _fields(mix={"mode": "blend", "perm": [1, 0], "lam": 0.5}),
}


@pytest.mark.parametrize("fields", SAME_ON_BOTH.values(), ids=SAME_ON_BOTH)
def test_one_bad_request_one_error_on_either_encoding(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as over_msgpack:
        wire.request_from_msgpack(msgpack.packb(fields, use_bin_type=True))
    with pytest.raises(InvalidRequest) as over_protobuf:
        wire.request_from_protobuf(protobuf_request(fields))
    assert over_msgpack.value.message == over_protobuf.value.message
    assert over_msgpack.value.model == over_protobuf.value.model == (fields.get("model") or None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([1, 2], "request body must be a map, got list"),
        (_fields(temprature=2.0), "unknown fields ['temprature']"),
        (_fields(temperature="2"), "temperature must be a number, got str"),
        (_fields(temperature=True), "temperature must be a number, got bool"),
        (
            _fields(images={**_fields()["images"], "dtype": ["uint8"]}),
            "images.dtype must be a string",
        ),
        (
            _fields(images={**_fields()["images"], "dtype": {"a": 1}}),
            "images.dtype must be a string",
        ),
        (
            _fields(images={**_fields()["images"], "shape": "2,3"}),
            "images.shape must be a list of ints",
        ),
        (_fields(mix=[1, 0]), "mix must be a map"),
        (_fields(top_k=2.5), "top_k must be an int, got float"),
    ],
)
def test_msgpack_fields_of_the_wrong_type_are_named(fields: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        wire.request_from_msgpack(msgpack.packb(fields, use_bin_type=True))


def test_malformed_answers_are_teacher_errors() -> None:
    with pytest.raises(TeacherError, match="malformed answer"):
        wire.result_from_msgpack(
            msgpack.packb({"logits": {"dtype": "uint8", "shape": [3], "data": b""}})
        )
    with pytest.raises(TeacherError, match="not a valid InferResponse"):
        wire.result_from_protobuf(b"\xff\xff\xff")
