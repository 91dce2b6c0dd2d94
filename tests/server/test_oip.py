"""The Open Inference Protocol (KServe v2) through tritonclient's own HTTP and gRPC clients.

A real server on loopback; the served logits must equal the in-process teacher's, and bad
requests get the protocol's errors (HTTP status / gRPC code from the error table) while the
server keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from teacher_server.server.serve import ServerThread
from teacher_server.shared._proto import grpc_predict_v2_pb2 as v2
from teacher_server.shared.oip import GRPC_SERVICE, HEADER_LENGTH, MAX_JSON_BYTES
from tests.helpers import TOKEN, in_process, random_images

TOL = 1e-4
Client = Any


def host(url: str) -> str:
    return url.split("://", 1)[1]


@pytest.fixture(params=["http", "grpc"])
def triton(request: pytest.FixtureRequest, server: ServerThread) -> Iterator[tuple[str, Client]]:
    """A tritonclient of the shared server, once per transport."""
    if request.param == "http":
        client: Client = thttp.InferenceServerClient(host(server.endpoints.http_url))
    else:
        client = tgrpc.InferenceServerClient(host(server.endpoints.grpc_url))
    try:
        yield request.param, client
    finally:
        client.close()


def module(transport: str) -> Any:
    return thttp if transport == "http" else tgrpc


def images_input(transport: str, images: torch.Tensor, *, binary: bool = True) -> Any:
    datatype = {torch.uint8: "UINT8", torch.float32: "FP32", torch.float16: "FP16"}[images.dtype]
    tensor = module(transport).InferInput("images", list(images.shape), datatype)
    if transport == "http":
        tensor.set_data_from_numpy(images.numpy(), binary_data=binary)
    else:
        tensor.set_data_from_numpy(images.numpy())
    return tensor


def requested(transport: str, name: str, *, binary: bool = True) -> Any:
    if transport == "http":
        return thttp.InferRequestedOutput(name, binary_data=binary)
    return tgrpc.InferRequestedOutput(name)


def status_of(error: InferenceServerException, transport: str) -> str:
    """The HTTP status ("400") or the gRPC code's name ("INVALID_ARGUMENT") of an error."""
    status = error.status()
    return str(status).removeprefix("StatusCode.") if transport == "grpc" else str(status)


def test_health_and_metadata(triton: tuple[str, Client]) -> None:
    transport, client = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("small") and client.is_model_ready("pair_probs")
    server = client.get_server_metadata(as_json=True) if transport == "grpc" else None
    server = server or client.get_server_metadata()
    assert server["name"] == "kdserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("wide", as_json=True) if transport == "grpc" else None
    meta = meta or client.get_model_metadata("wide")
    inputs, outputs = meta["inputs"], meta["outputs"]
    assert [(t["name"], t["datatype"]) for t in inputs] == [("images", "UINT8")]
    assert [int(d) for d in inputs[0]["shape"]] == [-1, 3, 40, 40]
    assert [(t["name"], t["datatype"]) for t in outputs] == [("logits", "FP32")]
    assert [int(d) for d in outputs[0]["shape"]] == [-1, 10]
    assert meta["versions"] == ["1"]
    ensemble = (
        client.get_model_metadata("pair_logits", as_json=True) if transport == "grpc" else None
    )
    ensemble = ensemble or client.get_model_metadata("pair_logits")
    assert ensemble["platform"] == "kdserve_ensemble"


@pytest.mark.parametrize("model", ["small", "wide", "pair_probs"])
def test_served_logits_equal_in_process(
    triton: tuple[str, Client], teachers: dict[str, Any], model: str
) -> None:
    transport, client = triton
    images = random_images(6, 32, seed=7)
    answer = client.infer(model, [images_input(transport, images)])
    served = torch.from_numpy(answer.as_numpy("logits").copy())
    if model == "pair_probs":
        probs = [in_process(teachers[m], images).softmax(-1) for m in ("small", "wide")]
        expected = ((probs[0] + probs[1]) / 2).log()
    else:
        expected = in_process(teachers[model], images)
    assert served.shape == (6, 10) and served.dtype == torch.float32
    assert (served - expected).abs().max().item() < TOL


def test_json_tensors_and_float_views(server: ServerThread, teachers: dict[str, Any]) -> None:
    """tritonclient's JSON (non-binary) inputs and outputs, and FP32 / FP16 views."""
    client = thttp.InferenceServerClient(host(server.endpoints.http_url))
    try:
        images = random_images(3, 32, seed=8)
        answer = client.infer(
            "small",
            [images_input("http", images, binary=False)],
            outputs=[requested("http", "logits", binary=False)],
        )
        served = torch.from_numpy(answer.as_numpy("logits").astype(np.float32))
        assert (served - in_process(teachers["small"], images)).abs().max().item() < TOL
        assert "data" in answer.get_response()["outputs"][0]
        for dtype in (torch.float32, torch.float16):
            view = torch.rand(2, 3, 32, 32).to(dtype)
            answer = client.infer("small", [images_input("http", view)])
            served = torch.from_numpy(answer.as_numpy("logits").copy())
            assert (served - in_process(teachers["small"], view)).abs().max().item() < TOL
    finally:
        client.close()


def test_parameters_temperature_output_dtype_and_top_k(
    triton: tuple[str, Client], teachers: dict[str, Any]
) -> None:
    transport, client = triton
    images = random_images(4, 32, seed=9)
    raw = in_process(teachers["small"], images)
    answer = client.infer(
        "small",
        [images_input(transport, images)],
        parameters={"temperature": 4.0, "output": "log_probs", "output_dtype": "FP16"},
    )
    served = answer.as_numpy("logits")
    assert served.dtype == np.float16
    expected = (raw / 4.0).log_softmax(-1)
    assert (torch.from_numpy(served.astype(np.float32)) - expected).abs().max().item() < 5e-3
    answer = client.infer(
        "small",
        [images_input(transport, images)],
        outputs=[requested(transport, "top_k_values"), requested(transport, "top_k_indices")],
        parameters={"top_k": 3},
    )
    values, indices = answer.as_numpy("top_k_values"), answer.as_numpy("top_k_indices")
    top = raw.topk(3, dim=-1)
    assert indices.dtype == np.int32 and (torch.from_numpy(indices.copy()) == top.indices).all()
    assert (torch.from_numpy(values.copy()) - top.values).abs().max().item() < TOL


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixed_views_equal_in_process(
    triton: tuple[str, Client], teachers: dict[str, Any], mode: str
) -> None:
    transport, client = triton
    images = random_images(5, 32, seed=3)
    perm = np.array([3, 2, 1, 0, 4], dtype=np.int64)
    inputs = [images_input(transport, images)]
    perm_input = module(transport).InferInput("mix_perm", [5], "INT64")
    perm_input.set_data_from_numpy(perm)
    inputs.append(perm_input)
    if mode == "mixup":
        mix: dict[str, Any] = {"mode": "mixup", "perm": perm.tolist(), "lam": 0.3}
        parameters: dict[str, Any] = {"mix": "mixup", "mix_lam": 0.3}
    else:
        mix = {"mode": "cutmix", "perm": perm.tolist(), "box": [4, 8, 20, 30]}
        parameters = {"mix": "cutmix"}
        box = module(transport).InferInput("mix_box", [4], "INT32")
        box.set_data_from_numpy(np.array(mix["box"], dtype=np.int32))
        inputs.append(box)
    answer = client.infer("small", inputs, parameters=parameters)
    served = torch.from_numpy(answer.as_numpy("logits").copy())
    assert (served - in_process(teachers["small"], images, mix)).abs().max().item() < TOL


def bad_request_cases(transport: str) -> list[tuple[str, Any, dict[str, Any], str, str]]:
    """(case, inputs, infer kwargs, HTTP status, gRPC code) for tritonclient-made bad requests."""
    m = module(transport)
    good = images_input(transport, random_images(2, 32))
    bad_type = m.InferInput("images", [2, 3, 32, 32], "INT32")
    bad_type.set_data_from_numpy(np.zeros((2, 3, 32, 32), dtype=np.int32))
    bad_shape = m.InferInput("images", [2, 32, 32], "UINT8")
    bad_shape.set_data_from_numpy(np.zeros((2, 32, 32), dtype=np.uint8))
    unknown = m.InferInput("pixels", [2, 3, 32, 32], "UINT8")
    unknown.set_data_from_numpy(np.zeros((2, 3, 32, 32), dtype=np.uint8))
    return [
        ("unknown model", [good], {"model_name": "nope"}, "404", "NOT_FOUND"),
        ("unknown version", [good], {"model_version": "7"}, "404", "NOT_FOUND"),
        ("INT32 images", [bad_type], {}, "400", "INVALID_ARGUMENT"),
        ("3-d images", [bad_shape], {}, "400", "INVALID_ARGUMENT"),
        ("unknown input", [unknown], {}, "400", "INVALID_ARGUMENT"),
        ("unknown parameter", [good], {"parameters": {"colour": "red"}}, "400", "INVALID_ARGUMENT"),
        ("temperature 0", [good], {"parameters": {"temperature": 0.0}}, "400", "INVALID_ARGUMENT"),
        ("bad output", [good], {"parameters": {"output": "softmax"}}, "400", "INVALID_ARGUMENT"),
        (
            "FP64 answer",
            [good],
            {"parameters": {"output_dtype": "FP64"}},
            "400",
            "INVALID_ARGUMENT",
        ),
        ("mix without perm", [good], {"parameters": {"mix": "mixup"}}, "400", "INVALID_ARGUMENT"),
        (
            "unknown output",
            [good],
            {"outputs": [requested(transport, "probs")]},
            "400",
            "INVALID_ARGUMENT",
        ),
        ("priority", [good], {"priority": 1}, "400", "INVALID_ARGUMENT"),
    ]


def test_bad_requests_get_the_protocols_errors(
    triton: tuple[str, Client], teachers: dict[str, Any]
) -> None:
    transport, client = triton
    for case, inputs, kwargs, http_status, grpc_code in bad_request_cases(transport):
        kwargs = {"model_name": "small", **kwargs}
        with pytest.raises(InferenceServerException) as caught:
            client.infer(inputs=inputs, **kwargs)
        expected = http_status if transport == "http" else grpc_code
        assert status_of(caught.value, transport) == expected, (case, caught.value.message())
        assert caught.value.message(), case
    images = random_images(2, 32)
    answer = client.infer("small", [images_input(transport, images)])
    served = torch.from_numpy(answer.as_numpy("logits").copy())
    assert (served - in_process(teachers["small"], images)).abs().max().item() < TOL
    assert not client.is_model_ready("nope") if transport == "http" else True


def test_malformed_rest_bodies(server: ServerThread) -> None:
    url = f"{server.endpoints.http_url}/v2/models/small/infer"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1, 3, 2, 2],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": 12},
                }
            ]
        }
    ).encode()
    cases = [
        (b"not json", {}),
        (b"[1, 2]", {}),
        (b'{"inputs": "images"}', {}),
        (
            b'{"inputs": [{"name": "images", "shape": [1, 3, 2, 2], "datatype": "UINT8", '
            b'"data": [1, 2]}]}',
            {},
        ),
        (
            b'{"inputs": [{"name": "images", "shape": [1, 3, 1, 1], "datatype": "UINT8", '
            b'"data": [1, 2, 300]}]}',
            {},
        ),
        (
            b'{"inputs": [{"name": "images", "shape": [1, 3, 1, 1], "datatype": "UINT8", '
            b'"data": [1, "2", 3]}]}',
            {},
        ),
        (header + bytes(11), {HEADER_LENGTH: str(len(header))}),
        (header + bytes(13), {HEADER_LENGTH: str(len(header))}),
        (header + bytes(12), {HEADER_LENGTH: "-1"}),
        (header + bytes(12), {HEADER_LENGTH: str(len(header) + 100)}),
    ]
    for body, headers in cases:
        answer = httpx.post(url, content=body, headers=headers)
        assert answer.status_code == 400, (body[:60], answer.text)
        assert isinstance(answer.json()["error"], str)
    deep = b'{"inputs": [{"name": "images", "shape": [1], "datatype": "UINT8", "data": '
    for body in (deep + b"[" * 100 + b"]" * 100 + b"}]}", b"[" * 100_000 + b"]" * 100_000):
        answer = httpx.post(url, content=body)
        assert answer.status_code == 400 and "nested" in answer.json()["error"], answer.text
    wide = b'{"inputs": [{"name": "images", "shape": [1], "datatype": "UINT8", "data": [%s]}]}'
    answer = httpx.post(url, content=wide % b",".join([b"0"] * (MAX_JSON_BYTES // 2 + 1)))
    assert answer.status_code == 413 and "binary" in answer.json()["error"], answer.text
    good = httpx.post(url, content=header + bytes(12), headers={HEADER_LENGTH: str(len(header))})
    assert good.status_code == 200
    assert good.json()["outputs"][0]["shape"] == [1, 10]


def test_undecodable_grpc_messages_are_invalid_argument(server: ServerThread) -> None:
    with grpc.insecure_channel(host(server.endpoints.grpc_url)) as channel:
        for method in ("ModelInfer", "ModelMetadata", "ModelReady"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"\xff\xff\xff", timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method


def test_a_token_is_needed_except_for_health(strict_server: ServerThread) -> None:
    images = random_images(2, 32)
    for transport, url in (
        ("http", strict_server.endpoints.http_url),
        ("grpc", strict_server.endpoints.grpc_url),
    ):
        m = module(transport)
        client = m.InferenceServerClient(host(url))
        try:
            assert client.is_server_live() and client.is_server_ready()
            with pytest.raises(InferenceServerException) as caught:
                client.infer("small", [images_input(transport, images)])
            expected = "401" if transport == "http" else "UNAUTHENTICATED"
            assert status_of(caught.value, transport) == expected
            with pytest.raises(InferenceServerException):
                client.get_model_metadata("small")
            headers = {"authorization": f"Bearer {TOKEN}"}  # tritonclient.http adds to it
            answer = client.infer("small", [images_input(transport, images)], headers=headers)
            assert answer.as_numpy("logits").shape == (2, 10)
        finally:
            client.close()


def test_typed_grpc_contents(server: ServerThread, teachers: dict[str, Any]) -> None:
    """A KServe v2 client that lists values in `contents` instead of raw bytes."""
    images = random_images(2, 32, seed=11)
    request = v2.ModelInferRequest(model_name="small")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
    with grpc.insecure_channel(host(server.endpoints.grpc_url)) as channel:
        infer = channel.unary_unary(f"/{GRPC_SERVICE}/ModelInfer")
        answer = v2.ModelInferResponse.FromString(infer(request.SerializeToString(), timeout=10))
        assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [
            ("logits", "FP32", [2, 10])
        ]
        served = torch.frombuffer(bytearray(answer.raw_output_contents[0]), dtype=torch.float32)
        expected = in_process(teachers["small"], images)
        assert (served.view(2, 10) - expected).abs().max().item() < TOL
        half = v2.ModelInferRequest(model_name="small")
        half.inputs.add(name="images", datatype="FP16", shape=[1, 3, 1, 1])
        mismatched = v2.ModelInferRequest(model_name="small", raw_input_contents=[b"", b""])
        mismatched.inputs.add(name="images", datatype="UINT8", shape=[0, 3, 1, 1])
        for bad in (half, mismatched):
            with pytest.raises(grpc.RpcError) as caught:
                infer(bad.SerializeToString(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
