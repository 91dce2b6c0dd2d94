"""Served answers equal the in-process teacher, through real servers and the real clients."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch

from teacher_server.client import TeacherClient
from teacher_server.server.serve import ServerThread, _listening_socket
from teacher_server.shared._proto import teacher_pb2, teacher_pb2_grpc
from teacher_server.shared.contract import Mix
from tests.helpers import (
    in_process,
    model_stats,
    random_images,
    running_server,
    teacher_config,
)

TOL = 1e-4


@pytest.mark.parametrize("view_size", [32, 24])
@pytest.mark.parametrize("model", ["small", "wide"])
def test_served_logits_equal_in_process(
    url: str, teachers: dict[str, Any], model: str, view_size: int
) -> None:
    images = random_images(6, view_size)
    with TeacherClient.connect(url, model=model) as client:
        served = client.infer(images)
    expected = in_process(teachers[model], images)
    assert served.shape == (6, 10) and served.dtype == torch.float32
    assert (served - expected).abs().max().item() < TOL


def test_float16_and_float32_views(url: str, teachers: dict[str, Any]) -> None:
    unit = torch.rand(4, 3, 32, 32)
    with TeacherClient.connect(url, model="small") as client:
        for dtype in (torch.float16, torch.float32, torch.bfloat16):
            view = unit.to(dtype)
            served = client.infer(view)
            expected = in_process(teachers["small"], view)
            assert (served - expected).abs().max().item() < TOL, dtype


@pytest.mark.parametrize(
    "mix",
    [
        {"mode": "mixup", "perm": [3, 2, 1, 0, 4], "lam": 0.3},
        {"mode": "cutmix", "perm": [1, 2, 3, 4, 0], "box": [4, 8, 20, 30]},
    ],
)
@pytest.mark.parametrize("model", ["small", "wide"])
def test_mixed_views_equal_in_process(
    url: str, teachers: dict[str, Any], mix: dict[str, Any], model: str
) -> None:
    images = random_images(5, 32, seed=3)
    client_mix = (
        Mix("mixup", tuple(mix["perm"]), lam=mix["lam"])
        if mix["mode"] == "mixup"
        else Mix.cutmix(tuple(mix["perm"]), tuple(mix["box"]), 32, 32)
    )
    with TeacherClient.connect(url, model=model) as client:
        served = client.infer(images, mix=client_mix)
        unmixed = client.infer(images)
    expected = in_process(teachers[model], images, mix)
    assert (served - expected).abs().max().item() < TOL
    assert (served - unmixed).abs().max().item() > 1e-3


def test_ensembles_equal_hand_combination(url: str, teachers: dict[str, Any]) -> None:
    images = random_images(4, 32, seed=5)
    small = in_process(teachers["small"], images)
    wide = in_process(teachers["wide"], images)
    mean_logits = (1.0 * small + 3.0 * wide) / 4.0
    mean_probs = torch.log((small.softmax(-1) + wide.softmax(-1)) / 2.0)
    with TeacherClient.connect(url) as client:
        assert (client.infer(images, model="pair_logits") - mean_logits).abs().max().item() < TOL
        assert (client.infer(images, model="pair_probs") - mean_probs).abs().max().item() < TOL
        tempered = client.infer(images, model="pair_probs", temperature=4.0)
        assert (tempered - mean_probs / 4.0).abs().max().item() < TOL


def test_temperature_outputs_dtypes_top_k(url: str, teachers: dict[str, Any]) -> None:
    images = random_images(3, 32, seed=7)
    raw = in_process(teachers["small"], images)
    with TeacherClient.connect(url, model="small") as client:
        base = client.infer(images)
        for temperature in (0.5, 2.0, 4.0):
            served = client.infer(images, temperature=temperature)
            assert torch.allclose(served, base / temperature, atol=1e-6)
        probs = client.infer(images, temperature=2.0, output="probs")
        assert (probs - (raw / 2.0).softmax(-1)).abs().max().item() < TOL
        assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
        log_probs = client.infer(images, output="log_probs")
        assert (log_probs - raw.log_softmax(-1)).abs().max().item() < TOL
        half = client.infer(images, output_dtype="float16", output="probs")
        assert half.dtype == torch.float16
        assert (half.float() - raw.softmax(-1)).abs().max().item() < 1e-3
        top = client.infer_top_k(images, 3, output="probs")
        expected_values, expected_indices = raw.softmax(-1).topk(3, dim=-1)
        assert top.indices.dtype == torch.int32 and top.values.shape == (3, 3)
        assert torch.equal(top.indices.long(), expected_indices)
        assert (top.values - expected_values).abs().max().item() < TOL


def test_list_models_same_on_both_transports(server: ServerThread) -> None:
    with (
        TeacherClient.connect(server.endpoints.http_url) as http,
        TeacherClient.connect(server.endpoints.grpc_url) as grpc_client,
    ):
        assert http.list_models() == grpc_client.list_models()
        by_name = {m.name: m for m in http.list_models()}
    assert by_name["wide"].input_size == (40, 40)
    assert (
        by_name["pair_probs"].members == ("small", "wide")
        and by_name["pair_probs"].combine == "mean_probs"
    )
    assert by_name["pair_probs"].input_size == (40, 40)


def test_concurrent_clients_are_batched_and_answered_correctly(
    server: ServerThread, teachers: dict[str, Any]
) -> None:
    """8 clients (4 HTTP, 4 gRPC) each get their own answers while the server forms big batches."""
    before = httpx.get(f"{server.endpoints.http_url}/v1/stats").json()["models"]["small"]
    errors: list[str] = []
    per_request = 4

    def student(index: int) -> None:
        url = server.endpoints.http_url if index % 2 else server.endpoints.grpc_url
        images = random_images(per_request, 32, seed=100 + index)
        expected = in_process(teachers["small"], images)
        with TeacherClient.connect(url, model="small") as client:
            for step in range(12):
                served = client.infer(images, request_id=f"student{index}-{step}")
                if (served - expected).abs().max().item() >= TOL:
                    errors.append(f"student {index} step {step} got another batch's answer")

    threads = [threading.Thread(target=student, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    after = httpx.get(f"{server.endpoints.http_url}/v1/stats").json()["models"]["small"]
    assert after["requests"]["ok"] - before["requests"].get("ok", 0) == 8 * 12
    new_passes = {
        int(size): count - before["batch_size_histogram"].get(size, 0)
        for size, count in after["batch_size_histogram"].items()
        if count > before["batch_size_histogram"].get(size, 0)
    }
    assert max(new_passes) > per_request, f"no pass merged requests: {new_passes}"
    metrics = httpx.get(f"{server.endpoints.http_url}/metrics").text
    assert 'kdserve_batch_size_bucket{le="+Inf",model="small"}' in metrics


def test_request_larger_than_max_batch_is_split(
    server: ServerThread, teachers: dict[str, Any]
) -> None:
    images = random_images(150, 32, seed=13)
    mix = Mix("mixup", tuple(reversed(range(150))), lam=0.7)
    with TeacherClient.connect(server.endpoints.grpc_url, model="small") as client:
        reply = client.request(images, mix=mix)
    assert reply.logits is not None
    assert len(reply.parts[0].timings.batch_sizes) >= 3
    assert max(reply.parts[0].timings.batch_sizes) <= 64
    expected = in_process(
        teachers["small"], images, {"mode": "mixup", "perm": list(reversed(range(150))), "lam": 0.7}
    )
    assert (reply.logits - expected).abs().max().item() < TOL


def test_http_listener_is_a_tcp_socket() -> None:
    """asyncio sets TCP_NODELAY only on connections from IPPROTO_TCP sockets (else ~40 ms waits)."""
    sock = _listening_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_idle_replicas_share_a_lone_request(teachers: dict[str, Any]) -> None:
    """Two one-thread replicas compute a lone 32-image request as two passes of 16 side by side."""
    config = teacher_config(teachers, replicas_per_device=2, threads_per_replica=1)
    with running_server(config) as two_replicas:
        images = random_images(32, 32, seed=17)
        with TeacherClient.connect(two_replicas.endpoints.grpc_url, model="small") as client:
            reply = client.request(images)
    assert reply.parts[0].timings.batch_sizes == (16, 16)
    assert reply.logits is not None
    assert (reply.logits - in_process(teachers["small"], images)).abs().max().item() < TOL


def test_stock_protobuf_stubs_are_answered(server: ServerThread, teachers: dict[str, Any]) -> None:
    """The .proto is the contract: a client made from the generated stubs alone is served."""
    images = random_images(3, 32, seed=40)
    request = teacher_pb2.InferRequest(
        model="small",
        images=teacher_pb2.Tensor(
            dtype="uint8", shape=list(images.shape), data=images.numpy().tobytes()
        ),
        request_id="stub",
        output_dtype="float16",
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.endpoints.grpc_port}") as channel:
        stub = teacher_pb2_grpc.TeacherStub(channel)
        answer = stub.Infer(request, timeout=30)
        listed = stub.ListModels(teacher_pb2.ListModelsRequest(), timeout=30)
    assert (answer.request_id, answer.model, answer.logits.dtype) == ("stub", "small", "float16")
    served = torch.frombuffer(bytearray(answer.logits.data), dtype=torch.float16).view(3, 10)
    expected = in_process(teachers["small"], images)
    assert (served.float() - expected).abs().max().item() < 1e-2
    assert {m.name for m in listed.models} == {"small", "wide", "pair_logits", "pair_probs"}


def test_low_precision_and_channels_last_models(teachers: dict[str, Any]) -> None:
    """bfloat16 autocast is on (answers close to fp32, not equal); channels_last is exact."""
    config = teacher_config(teachers)
    config["models"][0]["dtype"] = "bfloat16"
    config["models"][1]["channels_last"] = True
    config["server"]["device"] = ["cpu", "cpu"]
    images = random_images(8, 32, seed=23)
    with (
        running_server(config) as special,
        TeacherClient.connect(special.endpoints.http_url) as client,
    ):
        low = client.infer(images, model="small")
        last = client.infer(images, model="wide")
    exact = in_process(teachers["small"], images)
    assert 0 < (low - exact).abs().max().item() < 0.1
    assert (low.argmax(-1) == exact.argmax(-1)).float().mean().item() >= 0.75
    assert (last - in_process(teachers["wide"], images)).abs().max().item() < TOL


def test_padded_passes_answer_like_unpadded_and_count_their_padding(
    teachers: dict[str, Any],
) -> None:
    """pass_sizes pads each pass to a fixed size; the padding rows change no answer."""
    config = teacher_config(teachers)
    config["models"][0]["pass_sizes"] = [4, 16, 64]
    config["models"][1].update(pass_sizes=[8, 64], channels_last=True)
    sizes = [3, 6, 17, 50, 16, 1]
    with running_server(config) as padded, TeacherClient.connect(padded.endpoints.grpc_url) as c:
        for index, size in enumerate(sizes):
            images = random_images(size, 32, seed=40 + index)
            for model in ("small", "wide"):
                served = c.infer(images, model=model)
                expected = in_process(teachers[model], images)
                assert (served - expected).abs().max().item() < TOL, (model, size)
        mix = Mix("mixup", (4, 3, 2, 1, 0), lam=0.25)
        images = random_images(5, 32, seed=60)
        served = c.infer(images, model="small", mix=mix)
        expected = in_process(
            teachers["small"], images, {"mode": "mixup", "perm": mix.perm, "lam": 0.25}
        )
        assert (served - expected).abs().max().item() < TOL
        stats = model_stats(padded)
        metrics = httpx.get(f"{padded.endpoints.http_url}/metrics").text
    # Sequential requests, one pass each: 3->4, 6->16, 17->64, 50->64, 16, 1->4, then 5->16.
    assert stats["small"]["padding_images"] == 1 + 10 + 47 + 14 + 0 + 3 + 11
    assert stats["wide"]["padding_images"] == 5 + 2 + 47 + 14 + 48 + 7
    assert 'kdserve_padding_images_total{model="small"} 86.0' in metrics


@pytest.mark.slow
def test_compiled_model_answers_like_eager(teachers: dict[str, Any]) -> None:
    config = teacher_config(teachers)
    config["models"] = [{**config["models"][0], "compile": True}]
    config["ensembles"] = []
    images = random_images(5, 32, seed=29)
    with (
        running_server(config) as compiled,
        TeacherClient.connect(compiled.endpoints.grpc_url) as client,
    ):
        served = client.infer(images, model="small")
    assert (served - in_process(teachers["small"], images)).abs().max().item() < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float16_server_matches_in_process(teachers: dict[str, Any]) -> None:
    """On a GPU: fp16 autocast on the device, answers close to the fp32 model on the CPU."""
    config = teacher_config(teachers, device="cuda")
    config["models"][0].update(dtype="float16", channels_last=True)
    images = random_images(64, 32, seed=31)
    with running_server(config) as gpu, TeacherClient.connect(gpu.endpoints.grpc_url) as client:
        served = client.infer(images, model="small")
        mixed = client.infer(
            images, model="small", mix=Mix("mixup", tuple(range(63, -1, -1)), lam=0.4)
        )
    assert (served - in_process(teachers["small"], images)).abs().max().item() < 0.05
    mix = {"mode": "mixup", "perm": list(range(63, -1, -1)), "lam": 0.4}
    assert (mixed - in_process(teachers["small"], images, mix)).abs().max().item() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_and_pinned_uploads_answer_exactly_like_eager(
    teachers: dict[str, Any],
) -> None:
    """On a GPU: graph replays and pinned uploads compute the very logits of the eager pass."""
    eager = teacher_config(teachers, device="cuda")
    eager["models"][0].update(
        dtype="float16", channels_last=True, pass_sizes=[8, 64], pinned_upload=False
    )
    fast = teacher_config(teachers, device="cuda", replicas_per_device=2)
    fast["models"][0].update(
        dtype="float16", channels_last=True, pass_sizes=[8, 64], cuda_graphs=True
    )
    mix = Mix("cutmix", tuple(range(39, -1, -1)), box=(2, 3, 20, 30))
    requests = [(random_images(size, 32, seed=70 + size), None) for size in (1, 5, 8, 40, 64)]
    requests.append((random_images(40, 24, seed=80), mix))
    answers = []
    for config in (eager, fast):
        with (
            running_server(config) as gpu,
            TeacherClient.connect(gpu.endpoints.grpc_url) as client,
        ):
            answers.append([client.infer(x, model="small", mix=m) for x, m in requests])
    for (images, _), plain, graphed in zip(requests, *answers, strict=True):
        assert torch.equal(plain, graphed), images.shape


def test_models_load_on_a_thread_that_ends_and_its_errors_still_reach_the_server(
    teachers: dict[str, Any], tmp_path: Path
) -> None:
    """A thread left alive after torch's parallel kernels (building and warming up models)
    keeps its OpenMP team and leaves the passes one core: loading gets a thread of its own,
    gone by the time the server is ready; a model that cannot load still fails the start."""
    config = teacher_config(teachers)
    with running_server(config):
        assert not [t for t in threading.enumerate() if t.name == "kdserve-load"]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    config["models"][0]["weights"] = str(broken)
    config["ensembles"] = []
    with pytest.raises(Exception, match=r"broken\.safetensors"), running_server(config):
        pass
    assert not [t for t in threading.enumerate() if t.name == "kdserve-load"]
