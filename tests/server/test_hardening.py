"""The probe's defects, each through a real server: work bounds, deadlines between passes,
finite answers, slow HTTP clients, public docs with a token, undecodable gRPC messages."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import msgpack
import pytest
import torch

from teacher_server.client import TeacherClient
from teacher_server.server.serve import ServerThread
from teacher_server.shared import wire
from teacher_server.shared._proto import teacher_pb2 as pb
from tests.helpers import (
    AUTH,
    GRPC_AUTH,
    INFER_METHOD,
    SLOW_BATCH,
    grpc_call,
    in_process,
    model_stats,
    post,
    protobuf_request,
    random_images,
    running_server,
    teacher_config,
    tensor_map,
)


def fields(images: torch.Tensor, model: str = "small", **extra: Any) -> dict[str, Any]:
    return {"model": model, "images": tensor_map(images), **extra}


def http_error(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["name"], error["message"]


def grpc_error(error: grpc.RpcError | None) -> tuple[str, str]:
    assert error is not None, "the call succeeded"
    names = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    return error.code().name, names.get("kdserve-error", "")  # type: ignore[attr-defined]


def still_serves(server: ServerThread) -> None:
    assert post(server, fields(random_images(2))).status_code == 200
    assert grpc_call(server, fields(random_images(2))) is None


# ---- 1. the work one request may cause --------------------------------------------------


def test_tiny_images_by_the_thousand_are_refused_before_any_compute(
    strict_server: ServerThread,
) -> None:
    """20,000 1x1 images make a 60 KB body but 20,000 upsampled forward rows: 413 at once."""
    flood = fields(torch.zeros(20_000, 3, 1, 1, dtype=torch.uint8))
    before = model_stats(strict_server)["small"]["executed_images"]
    started = time.monotonic()
    status, name, message = http_error(post(strict_server, flood))
    assert (status, name) == (413, "request_too_large")
    assert "20000 images" in message and "max_request_images" in message
    assert grpc_error(grpc_call(strict_server, flood)) == (
        "RESOURCE_EXHAUSTED",
        "request_too_large",
    )
    assert time.monotonic() - started < 10
    assert model_stats(strict_server)["small"]["executed_images"] == before
    still_serves(strict_server)


def test_the_queue_limit_holds_for_a_first_request(strict_server: ServerThread) -> None:
    """max_queue_images 100 on the strict server: 101 images never fit, whatever the queue."""
    status, name, message = http_error(
        post(
            strict_server,
            fields(torch.zeros(101, 3, 8, 8, dtype=torch.uint8), "slow"),
            model="slow",
        )
    )
    assert (status, name) == (413, "request_too_large")
    assert "over the 100 one request may carry" in message


@pytest.fixture(scope="module")
def pixel_bound(teachers: dict[str, Any]) -> Iterator[ServerThread]:
    """max_request_pixels of 100 images of `wide` (40x40): `small` takes 156, the pair 60."""
    with running_server(teacher_config(teachers, max_request_pixels=100 * 40 * 40)) as server:
        yield server


def test_each_model_says_how_many_images_a_request_may_carry(pixel_bound: ServerThread) -> None:
    listed = httpx.get(f"{pixel_bound.endpoints.http_url}/v1/models").json()
    by_name = {m["name"]: m["max_images"] for m in listed["models"]}
    assert by_name == {"small": 156, "wide": 100, "pair_logits": 60, "pair_probs": 60}
    assert listed["limits"]["max_request_pixels"] == 160_000
    with TeacherClient.connect(pixel_bound.endpoints.grpc_url) as client:
        assert {m.name: m.max_images for m in client.list_models()} == by_name


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_the_client_splits_by_images_and_the_answer_is_exact(
    pixel_bound: ServerThread, teachers: dict[str, Any], transport: str
) -> None:
    endpoints = pixel_bound.endpoints
    url = endpoints.http_url if transport == "http" else endpoints.grpc_url
    images = random_images(150, size=32, seed=3)
    with TeacherClient.connect(url, model="wide") as client:
        reply = client.request(images)
        over = fields(images[:101], "wide")
    assert [part.logits.shape[0] for part in reply.parts] == [100, 50]  # type: ignore[union-attr]
    assert reply.logits is not None
    torch.testing.assert_close(
        reply.logits, in_process(teachers["wide"], images), atol=1e-4, rtol=0
    )
    assert http_error(post(pixel_bound, over, model="wide"))[:2] == (413, "request_too_large")


# ---- deadlines between passes, abandoned requests ------------------------------------------


def slow_request(images: int) -> dict[str, Any]:
    return fields(torch.zeros(images, 3, 8, 8, dtype=torch.uint8), "slow")


def wait_for_idle(server: ServerThread, model: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        stats = model_stats(server)[model]
        if stats["pending_images"] == 0:
            time.sleep(0.3)  # a pass handed out before the stop still ends
            return model_stats(server)[model]
        assert time.monotonic() < deadline, "the slow model kept its queue"
        time.sleep(0.02)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_long_request_stops_computing_at_its_deadline(
    strict_server: ServerThread, transport: str
) -> None:
    """100 images in passes of 4 take seconds; a 300 ms deadline stops them between passes."""
    before = model_stats(strict_server)["slow"]["executed_images"]
    started = time.monotonic()
    if transport == "http":
        response = post(
            strict_server, slow_request(100), model="slow", headers={wire.TIMEOUT_HEADER: "300"}
        )
        status, name, message = http_error(response)
        assert (status, name) == (504, "deadline_exceeded")
        assert "of its 100 images were computed or started" in message
    else:
        error = grpc_call(strict_server, slow_request(100), timeout=0.3)
        assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5
    after = wait_for_idle(strict_server, "slow")["executed_images"]
    assert after - before < 100 - 4 * SLOW_BATCH
    still_serves(strict_server)


def test_a_cancelled_grpc_call_stops_being_computed(strict_server: ServerThread) -> None:
    """A call without a deadline, cancelled by its client: the rest is never computed."""
    before = model_stats(strict_server)["slow"]["executed_images"]
    with grpc.insecure_channel(f"127.0.0.1:{strict_server.endpoints.grpc_port}") as channel:
        call = channel.unary_unary(INFER_METHOD, None, None).future(
            protobuf_request(slow_request(100)), metadata=GRPC_AUTH
        )
        deadline = time.monotonic() + 10
        while model_stats(strict_server)["slow"]["executed_images"] == before:
            assert time.monotonic() < deadline, "the slow model never started"
            time.sleep(0.005)
        assert call.cancel()
    after = wait_for_idle(strict_server, "slow")
    assert after["executed_images"] - before < 100 - 4 * SLOW_BATCH
    assert after["requests"].get("cancelled", 0) >= 1


def test_an_http_client_that_hangs_up_stops_its_request(strict_server: ServerThread) -> None:
    before = model_stats(strict_server)["slow"]["executed_images"]
    with pytest.raises(httpx.ReadTimeout):
        post(strict_server, slow_request(100), model="slow", timeout=0.3)
    after = wait_for_idle(strict_server, "slow")
    assert after["executed_images"] - before < 100 - 4 * SLOW_BATCH


# ---- 2, 3: bad fields answer 400 ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [["uint8"], {"uint8": 1}, 7, None])
def test_an_images_dtype_of_the_wrong_type_is_400(server: ServerThread, dtype: Any) -> None:
    body = fields(random_images(1))
    body["images"]["dtype"] = dtype
    status, name, message = http_error(post(server, body))
    assert (status, name) == (400, "invalid_request") and "images.dtype" in message


def test_an_images_dtype_of_the_wrong_wire_type_is_invalid_argument(server: ServerThread) -> None:
    """Over protobuf, images.dtype sent as a varint, not a string: protobuf keeps it as an
    unknown field, so the request has no dtype."""
    images = random_images(1)
    tensor = pb.Tensor(shape=list(images.shape), data=images.numpy().tobytes()).SerializeToString()
    tensor += bytes([(pb.Tensor.DTYPE_FIELD_NUMBER << 3) | 0, 7])
    request = pb.InferRequest(model="small").SerializeToString()
    request += bytes([(pb.InferRequest.IMAGES_FIELD_NUMBER << 3) | 2]) + varint(len(tensor))
    error = grpc_call(server, raw=request + tensor)
    assert grpc_error(error) == ("INVALID_ARGUMENT", "invalid_request")
    assert "images.dtype" in error.details()  # type: ignore[union-attr]


def varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out += bytes([(value & 0x7F) | 0x80])
        value >>= 7
    return out + bytes([value])


@pytest.mark.parametrize(
    ("temperature", "output_dtype"),
    [
        (1e-300, "float32"),
        (5e-324, "float32"),
        (1e-40, "float16"),
        (1e6, "float32"),
        (1e-3, "float32"),
    ],
)
def test_temperatures_outside_the_bounds_are_400(
    server: ServerThread, temperature: float, output_dtype: str
) -> None:
    body = fields(random_images(2), temperature=temperature, output_dtype=output_dtype)
    status, name, message = http_error(post(server, body))
    assert (status, name) == (
        400,
        "invalid_request",
    ) and "temperature must be in [0.01, 10000]" in message
    code, name = grpc_error(grpc_call(server, body))
    assert (code, name) == ("INVALID_ARGUMENT", "invalid_request")


@pytest.mark.parametrize("output", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("output_dtype", ["float16", "bfloat16", "float32"])
def test_the_lowest_temperature_answers_finite_values_or_400(
    server: ServerThread, output: str, output_dtype: str
) -> None:
    body = fields(
        random_images(4, seed=5), temperature=0.01, output=output, output_dtype=output_dtype
    )
    response = post(server, body)
    if response.status_code == 200:
        answer = msgpack.unpackb(response.content)["logits"]
        dtype = getattr(torch, answer["dtype"])
        values = torch.frombuffer(bytearray(answer["data"]), dtype=dtype)
        assert bool(torch.isfinite(values).all())
    else:
        status, name, message = http_error(response)
        assert (status, name) == (400, "invalid_request") and output_dtype in message


# ---- 4. undecodable gRPC messages ----------------------------------------------------------


def test_undecodable_grpc_messages_are_invalid_argument_and_one_log_line_at_most(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = [b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)), b"\x12\x05abc"]
    with caplog.at_level(logging.DEBUG):
        for body in garbage * 5:
            assert grpc_error(grpc_call(server, raw=body)) == (
                "INVALID_ARGUMENT",
                "invalid_request",
            )
    assert len(caplog.records) <= len(garbage) * 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    still_serves(server)


# ---- 5. slow or incomplete HTTP requests ---------------------------------------------------


@pytest.fixture(scope="module")
def guarded(teachers: dict[str, Any]) -> Iterator[ServerThread]:
    config = teacher_config(teachers, header_timeout_s=0.5, body_timeout_s=1.0, max_connections=8)
    with running_server(config) as server:
        yield server


def raw_connection(server: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.endpoints.http_port), timeout=10)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """The status and JSON error body of the one answer, read until the server closes (a
    server that keeps the connection open fails the read's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def infer_head(server: ServerThread, length: int) -> bytes:
    return (
        f"POST /v1/models/small/infer HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-type: application/msgpack\r\ncontent-length: {length}\r\n\r\n"
    ).encode()


def test_a_body_shorter_than_its_length_times_out_with_408(guarded: ServerThread) -> None:
    body = msgpack.packb(fields(random_images(1)), use_bin_type=True)
    with raw_connection(guarded) as sock:
        sock.sendall(infer_head(guarded, len(body)) + body[:-10])
        started = time.monotonic()
        status, error = read_answer(sock)
    assert status == 408
    assert error["error"]["name"] == "request_timeout"
    assert "body_timeout_s" in error["error"]["message"]
    assert time.monotonic() - started < 5
    still_serves(guarded)


def test_a_body_sent_a_byte_at_a_time_times_out(guarded: ServerThread) -> None:
    body = msgpack.packb(fields(random_images(1)), use_bin_type=True)
    with raw_connection(guarded) as sock:
        sock.sendall(infer_head(guarded, len(body)))
        started = time.monotonic()
        for byte in body[:40]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        status, error = read_answer(sock)
    assert (status, error["error"]["name"]) == (408, "request_timeout")
    assert time.monotonic() - started < 6


def test_a_request_head_that_never_ends_times_out(guarded: ServerThread) -> None:
    with raw_connection(guarded) as sock:
        sock.sendall(b"POST /v1/models/small/infer HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        status, error = read_answer(sock)
    assert status == 408
    assert "header_timeout_s" in error["error"]["message"]


def test_a_kept_alive_connection_idle_between_requests_is_not_timed_out(
    guarded: ServerThread,
) -> None:
    """Only a head that has begun (or a fresh connection) is timed; idle keep-alive is not."""
    body = msgpack.packb(fields(random_images(1)), use_bin_type=True)
    with raw_connection(guarded) as sock:
        for _ in range(2):
            sock.sendall(infer_head(guarded, len(body)) + body)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            head, _, rest = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += sock.recv(65536)
            time.sleep(1.0)  # twice header_timeout_s, under the keep-alive timeout


def test_connections_over_the_limit_are_503_and_the_rest_keep_serving(
    guarded: ServerThread,
) -> None:
    held = [raw_connection(guarded) for _ in range(8)]
    try:
        time.sleep(0.1)
        with raw_connection(guarded) as extra:
            status, error = read_answer(extra)
        assert status == 503
        assert (
            error["error"]["name"] == "not_ready"
            and "max_connections 8" in error["error"]["message"]
        )
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while post(guarded, fields(random_images(1))).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_half_sent_connections_are_all_let_go(guarded: ServerThread) -> None:
    """Many half-sent requests cannot hold the server: each is answered 408 and closed."""
    socks = [raw_connection(guarded) for _ in range(6)]
    for sock in socks:
        sock.sendall(b"POST /v1/models/small/infer HTTP/1.1\r\n")
    results = [read_answer(sock) for sock in socks]
    for sock in socks:
        sock.close()
    assert {status for status, _ in results} == {408}
    still_serves(guarded)


# ---- 7. docs with a token --------------------------------------------------------------------


def test_docs_are_off_with_a_token_and_on_without(
    server: ServerThread, strict_server: ServerThread
) -> None:
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(f"{strict_server.endpoints.http_url}{path}").status_code == 404
        assert (
            httpx.get(f"{strict_server.endpoints.http_url}{path}", headers=AUTH).status_code == 404
        )
        assert httpx.get(f"{server.endpoints.http_url}{path}").status_code == 200
