"""Every row of the error table, on both transports, and the server still answers afterwards."""

from __future__ import annotations

import math
import re
import struct
import threading
import time
from typing import Any

import grpc
import httpx
import msgpack
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_server.client import RetryPolicy, TeacherClient
from teacher_server.server.config import load_config
from teacher_server.server.serve import ServerThread
from teacher_server.shared import wire
from tests.archives import save_slow, save_truncating
from tests.helpers import (
    AUTH,
    BUSY_CLIENT,
    SLOW_BATCH,
    TOKEN,
    grpc_call,
    grpc_status,
    model_stats,
    occupy_slow_model,
    post,
    running_server,
    teacher_config,
    tensor_map,
)


def good_fields(model: str = "small", n: int = 2, value: int = 100) -> dict[str, Any]:
    images = torch.full((n, 3, 32, 32), value, dtype=torch.uint8)
    return {"model": model, "images": tensor_map(images)}


def assert_still_serving(server: ServerThread) -> None:
    assert post(server, good_fields()).status_code == 200
    assert grpc_status(server, good_fields()) == grpc.StatusCode.OK


BAD_REQUESTS: list[tuple[str, Any]] = [
    ("not a map", [1, 2, 3]),
    ("unknown field", {**good_fields(), "temprature": 2.0}),
    (
        "bad dtype",
        {
            **good_fields(),
            "images": {
                **tensor_map(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
                "dtype": "int64",
            },
        },
    ),
    (
        "bad shape",
        {**good_fields(), "images": tensor_map(torch.zeros(2, 8, 8, dtype=torch.uint8))},
    ),
    (
        "four channels",
        {**good_fields(), "images": tensor_map(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))},
    ),
    (
        "length mismatch",
        {
            **good_fields(),
            "images": {
                **tensor_map(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
                "shape": [2, 3, 8, 9],
            },
        },
    ),
    (
        "overflowing shape",
        {
            **good_fields(),
            "images": {"dtype": "uint8", "shape": [0, 2**63 - 1, 2**40], "data": b""},
        },
    ),
    (
        "five dims",
        {**good_fields(), "images": tensor_map(torch.zeros(1, 1, 3, 2, 2, dtype=torch.uint8))},
    ),
    ("output of wrong type", {**good_fields(), "output": 0}),
    ("request_id of wrong type", {**good_fields(), "request_id": 7}),
    ("mixup without lam", {**good_fields(), "mix": {"mode": "mixup", "perm": [1, 0]}}),
    (
        "empty batch",
        {**good_fields(), "images": tensor_map(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))},
    ),
    ("zero temperature", {**good_fields(), "temperature": 0.0}),
    ("negative temperature", {**good_fields(), "temperature": -1.0}),
    ("nan temperature", {**good_fields(), "temperature": math.nan}),
    ("float above one", {**good_fields(), "images": tensor_map(torch.full((1, 3, 8, 8), 2.0))}),
    ("bad output", {**good_fields(), "output": "softmax"}),
    ("bad output dtype", {**good_fields(), "output_dtype": "int8"}),
    ("top_k above classes", {**good_fields(), "top_k": 11}),
    ("perm out of range", {**good_fields(), "mix": {"mode": "mixup", "perm": [0, 5], "lam": 0.5}}),
    ("lam above one", {**good_fields(), "mix": {"mode": "mixup", "perm": [1, 0], "lam": 1.5}}),
    (
        "box outside",
        {**good_fields(), "mix": {"mode": "cutmix", "perm": [1, 0], "box": [0, 0, 33, 10]}},
    ),
    ("cutmix without box", {**good_fields(), "mix": {"mode": "cutmix", "perm": [1, 0]}}),
    ("empty model", {**good_fields(), "model": ""}),
    ("empty output", {**good_fields(), "output": ""}),
    ("empty output dtype", {**good_fields(), "output_dtype": ""}),
    ("empty mix mode", {**good_fields(), "mix": {"mode": "", "perm": [1, 0], "lam": 0.5}}),
    ("no images", {"model": "small"}),
    ("images without dtype", {**good_fields(), "images": {"shape": [1, 3, 2, 2], "data": b"1"}}),
]


@pytest.mark.parametrize(("case", "fields"), BAD_REQUESTS, ids=[c for c, _ in BAD_REQUESTS])
def test_bad_request_is_400_over_http(strict_server: ServerThread, case: str, fields: Any) -> None:
    response = post(strict_server, fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert response.json()["error"]["message"]


HTTP_ONLY = ("not a map", "unknown field", "output of wrong type", "request_id of wrong type")
GRPC_CASES = [c for c in BAD_REQUESTS if c[0] not in HTTP_ONLY]


@pytest.mark.parametrize(("case", "fields"), GRPC_CASES, ids=[c for c, _ in GRPC_CASES])
def test_grpc_refuses_each_bad_request_with_the_same_error_as_http(
    strict_server: ServerThread, case: str, fields: Any
) -> None:
    over_http = post(strict_server, fields).json()["error"]
    error = grpc_call(strict_server, fields)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailing = dict(error.trailing_metadata())
    assert (trailing["kdserve-error"], error.details()) == (
        over_http["name"],
        over_http["message"],
    )
    assert over_http["name"] == "invalid_request"


def test_malformed_bodies(strict_server: ServerThread) -> None:
    assert post(strict_server, None, raw=b"\xc1\xff not msgpack").status_code == 400
    assert (
        post(strict_server, None, raw=msgpack.packb(good_fields()) + b"trailing").status_code == 400
    )
    wrong_type = post(strict_server, good_fields(), headers={"content-type": "application/json"})
    assert wrong_type.status_code == 400 and "content-type" in wrong_type.json()["error"]["message"]
    mismatch = post(strict_server, good_fields(model="wide"), model="small")
    assert mismatch.status_code == 400
    for garbage in (b"\xff\xff\xff not protobuf", b"\x12\x05abc"):
        error = grpc_call(strict_server, raw=garbage)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid InferRequest message" in error.details()
    assert_still_serving(strict_server)


def test_malformed_framed_bodies_are_400_and_a_good_one_is_answered_framed(
    strict_server: ServerThread,
) -> None:
    framed = {"content-type": wire.FRAMED_CONTENT_TYPE}
    images = torch.full((2, 3, 32, 32), 7, dtype=torch.uint8)
    header = msgpack.packb({"images": {"dtype": "uint8", "shape": [2, 3, 32, 32]}})
    good = struct.pack("<I", len(header)) + header + images.numpy().tobytes()
    answer = post(strict_server, None, raw=good, headers=framed)
    assert answer.status_code == 200 and answer.headers["content-type"] == wire.FRAMED_CONTENT_TYPE
    logits = wire.result_from_framed(answer.content).logits
    over_msgpack = wire.result_from_msgpack(post(strict_server, good_fields(value=7)).content)
    assert logits is not None and torch.equal(logits, over_msgpack.logits)
    for body, message in [
        (b"\x00", "4-byte header length"),
        (struct.pack("<I", 10**6) + header, "runs past the body"),
        (good[:-1], "has 6143 bytes but shape [2, 3, 32, 32]"),
        (msgpack.packb(good_fields()), "header length"),
    ]:
        refused = post(strict_server, None, raw=body, headers=framed)
        assert refused.status_code == 400, refused.text
        assert message in refused.json()["error"]["message"]
    assert_still_serving(strict_server)


def test_invalid_requests_count_against_the_model_they_name(strict_server: ServerThread) -> None:
    before = model_stats(strict_server)["small"]["requests"].get("invalid", 0)
    assert post(strict_server, {**good_fields(), "temprature": 2.0}).status_code == 400
    assert post(strict_server, None, raw=b"\xc1 not msgpack").status_code == 400  # URL: small
    assert grpc_status(strict_server, {**good_fields(), "temperature": 0.0}) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert model_stats(strict_server)["small"]["requests"]["invalid"] == before + 3


def test_error_messages_name_field_and_value(strict_server: ServerThread) -> None:
    message = post(strict_server, {**good_fields(), "temperature": -3.0}).json()["error"]["message"]
    assert "temperature" in message and "-3.0" in message
    shape = {**tensor_map(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), "shape": [2, 3, 8, 9]}
    message = post(strict_server, {**good_fields(), "images": shape}).json()["error"]["message"]
    assert "384 bytes" in message and "[2, 3, 8, 9]" in message


def test_unknown_model_is_404_not_found(strict_server: ServerThread) -> None:
    response = post(strict_server, good_fields(model="nope"), model="nope")
    assert response.status_code == 404
    assert "small" in response.json()["error"]["message"]
    assert grpc_status(strict_server, good_fields(model="nope")) == grpc.StatusCode.NOT_FOUND


def test_token_is_required(strict_server: ServerThread) -> None:
    url = strict_server.endpoints.http_url
    no_token = httpx.post(
        f"{url}/v1/models/small/infer",
        content=msgpack.packb(good_fields()),
        headers={"content-type": "application/msgpack"},
    )
    assert no_token.status_code == 401
    wrong = post(strict_server, good_fields(), headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert grpc_status(strict_server, good_fields(), metadata=()) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_status(strict_server, good_fields(), metadata=(("authorization", "Bearer x"),)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    with TeacherClient.connect(
        strict_server.endpoints.grpc_url, token=TOKEN, model="small"
    ) as client:
        assert client.infer(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 10)
    assert_still_serving(strict_server)


def test_oversized_body_is_413_resource_exhausted(strict_server: ServerThread) -> None:
    """Our own limit on both transports: the same error, each naming its body's size."""
    fields = good_fields(n=70)
    assert len(msgpack.packb(fields)) > 200_000
    response = post(strict_server, fields)
    assert response.status_code == 413
    assert response.json()["error"]["name"] == "request_too_large"
    error = grpc_call(strict_server, fields)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())["kdserve-error"] == "request_too_large"
    limit = r"body of \d+ bytes is over the limit of 200000 bytes \(max_request_bytes\)"
    assert re.fullmatch(limit, response.json()["error"]["message"])
    assert re.fullmatch(limit, error.details())
    beyond = grpc_call(strict_server, good_fields(n=150))  # over twice the limit: grpcio's own
    assert beyond is not None and beyond.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "kdserve-error" not in dict(beyond.trailing_metadata() or ())
    assert_still_serving(strict_server)


def test_full_queue_is_429_with_retry_hint(strict_server: ServerThread) -> None:
    busy = occupy_slow_model(strict_server, 96)
    try:
        fields = {
            "model": "slow",
            "images": tensor_map(torch.zeros(32, 3, 8, 8, dtype=torch.uint8)),
        }
        response = post(strict_server, fields, model="slow")
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert float(response.headers["retry-after-ms"]) > 0
        assert grpc_status(strict_server, fields) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert post(strict_server, good_fields()).status_code == 200
    finally:
        busy.join()
    assert model_stats(strict_server)["slow"]["requests"]["queue_full"] >= 2
    assert post(strict_server, fields, model="slow").status_code == 200


def test_expired_request_is_504_and_never_computed(strict_server: ServerThread) -> None:
    fields = {
        "model": "slow",
        "images": tensor_map(torch.zeros(4, 3, 8, 8, dtype=torch.uint8)),
        "client_id": BUSY_CLIENT,
    }
    before = model_stats(strict_server)["slow"]
    busy = occupy_slow_model(strict_server, 60)  # each transport behind its own busy request
    try:
        response = post(
            strict_server, fields, model="slow", headers={"x-request-timeout-ms": "150"}
        )
        assert response.status_code == 504, response.text
    finally:
        busy.join()
    busy = occupy_slow_model(strict_server, 60)
    try:
        assert grpc_status(strict_server, fields, timeout=0.15) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        busy.join()
    after = model_stats(strict_server)["slow"]
    assert (
        after["requests"]["deadline_exceeded"] - before["requests"].get("deadline_exceeded", 0) >= 1
    )  # the gRPC call's own deadline may pass first: the server then counts it cancelled
    assert after["executed_images"] - before["executed_images"] <= 120, (
        "an expired request was computed"
    )
    assert_still_serving(strict_server)


def test_model_failure_is_500_internal_and_isolated(strict_server: ServerThread) -> None:
    bad = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    bad[1, 0, 0, 0] = 255
    bad_fields = {"model": "flaky", "images": tensor_map(bad)}
    good = {
        "model": "flaky",
        "images": tensor_map(torch.full((3, 3, 8, 8), 100, dtype=torch.uint8)),
    }
    results: dict[str, int] = {}

    def send(name: str, fields: dict[str, Any]) -> None:
        results[name] = post(strict_server, fields, model="flaky").status_code

    threads = [threading.Thread(target=send, args=(f"bad{i}", bad_fields)) for i in range(3)]
    threads += [threading.Thread(target=send, args=(f"good{i}", good)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {v for k, v in results.items() if k.startswith("bad")} == {500}
    assert {v for k, v in results.items() if k.startswith("good")} == {200}
    assert grpc_status(strict_server, bad_fields) == grpc.StatusCode.INTERNAL
    assert grpc_status(strict_server, good) == grpc.StatusCode.OK
    assert model_stats(strict_server)["flaky"]["requests"]["failed"] >= 4


def test_not_ready_is_503_unavailable(teachers: dict[str, Any], tmp_path: Any) -> None:
    config = teacher_config(teachers)
    config["models"].append(
        {
            "name": "heavy",
            "arch": f"file:{save_slow(tmp_path / 'heavy.pt', 800)}",
            "num_classes": 10,
            "input_size": 8,
        }
    )
    with running_server(config, wait_ready=False) as server:
        url = server.endpoints.http_url
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 503
        response = httpx.post(
            f"{url}/v1/models/small/infer",
            content=msgpack.packb(good_fields()),
            headers={"content-type": "application/msgpack"},
        )
        assert response.status_code == 503
        assert grpc_status(server, good_fields(), metadata=()) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{server.endpoints.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with TeacherClient.connect(
                server.endpoints.grpc_url, model="small", retry=RetryPolicy(attempts=100)
            ) as client:
                assert client.infer(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 10)
            status = health.Check(
                health_pb2.HealthCheckRequest(service="kdserve.v1.Teacher")
            ).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_model_returning_too_few_rows_is_500_and_the_replica_survives(
    teachers: dict[str, Any], tmp_path: Any
) -> None:
    config = teacher_config(teachers)
    archive = save_truncating(tmp_path / "t.pt")
    config["models"].append(
        {"name": "truncating", "arch": f"file:{archive}", "num_classes": 10, "input_size": 8}
    )
    with running_server(config) as server:
        url = f"{server.endpoints.http_url}/v1/models/truncating/infer"
        headers = {"content-type": "application/msgpack"}
        for _ in range(2):
            bad = httpx.post(
                url, content=msgpack.packb(good_fields("truncating", n=3)), headers=headers
            )
            assert bad.status_code == 500 and "3 images" in bad.json()["error"]["message"]
            good = httpx.post(
                url, content=msgpack.packb(good_fields("truncating", n=2)), headers=headers
            )
            assert good.status_code == 200


def test_http_client_that_hangs_up_is_not_computed(strict_server: ServerThread) -> None:
    busy = occupy_slow_model(strict_server, 60)
    try:
        before = model_stats(strict_server)["slow"]
        fields = {
            "model": "slow",
            "images": tensor_map(torch.zeros(8, 3, 8, 8, dtype=torch.uint8)),
            "client_id": BUSY_CLIENT,
        }
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{strict_server.endpoints.http_url}/v1/models/slow/infer",
                content=msgpack.packb(fields),
                headers={"content-type": "application/msgpack", **AUTH},
                timeout=0.2,
            )
    finally:
        busy.join()
    time.sleep(0.2)
    after = model_stats(strict_server)["slow"]
    assert after["requests"]["cancelled"] - before["requests"].get("cancelled", 0) == 1
    computed = after["executed_images"] - before["executed_images"]
    assert computed <= 60, f"{computed} images computed: the hung-up request ran"


def test_shutdown_drains_in_flight_requests_and_refuses_new_ones(
    teachers: dict[str, Any], tmp_path: Any
) -> None:
    config = teacher_config(teachers, max_batch_size=SLOW_BATCH)
    archive = save_slow(tmp_path / "s.pt", 30)
    config["models"].append(
        {"name": "slow", "arch": f"file:{archive}", "num_classes": 10, "input_size": 8}
    )
    server = ServerThread(load_config(data=config, environ={})).start()
    url = server.endpoints.http_url
    in_flight: dict[str, int] = {}
    body = msgpack.packb(
        {"model": "slow", "images": tensor_map(torch.zeros(40, 3, 8, 8, dtype=torch.uint8))}
    )

    def long_request() -> None:
        response = httpx.post(
            f"{url}/v1/models/slow/infer",
            content=body,
            headers={"content-type": "application/msgpack"},
            timeout=30,
        )
        in_flight["status"] = response.status_code

    request = threading.Thread(target=long_request)
    request.start()
    while model_stats(server)["slow"]["pending_images"] == 0:
        time.sleep(0.005)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    readiness = 200
    while readiness == 200:
        try:
            readiness = httpx.get(f"{url}/readyz").status_code
        except httpx.TransportError:
            readiness = -1
    request.join()
    stopper.join()
    assert readiness in (503, -1)
    assert in_flight["status"] == 200, "the request in flight was not drained"
