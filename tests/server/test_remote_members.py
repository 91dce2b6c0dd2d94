"""Ensemble members on other teacher servers: two real servers on loopback.

The front server serves `small` itself and asks a member server for `wide`; its ensembles
must answer what the in-process combination of both teachers is, and exactly the
combination of what each server answers alone. A member that is down, slow or refuses the
front's token gives the documented error naming it; a quorum answers from fewer members and
says which; killing a member mid-run and starting it again is survived.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from prometheus_client.parser import text_string_to_metric_families

from teacher_server.client import RetryPolicy, TeacherClient
from teacher_server.server.outputs import combine_members
from teacher_server.server.registry import ModelLoadError
from teacher_server.server.serve import ServerThread
from teacher_server.shared.contract import Mix
from teacher_server.shared.errors import NotReady
from tests.helpers import (
    AUTH,
    BUSY_CLIENT,
    TOKEN,
    TeacherProcess,
    grpc_call,
    in_process,
    model_stats,
    occupy_slow_model,
    post,
    random_images,
    refusing_port,
    running_server,
    teacher_config,
    tensor_map,
    wait_until,
)

TOL = 1e-4
ONCE = RetryPolicy(attempts=1)
"""The test's own client does not retry: each error is the front server's answer."""


def front_config(teachers: dict[str, Any], wide: dict[str, str], **remote: Any) -> dict[str, Any]:
    """`small` served here; `wide` asked of the member over each transport."""
    config = teacher_config(teachers)
    config["models"] = config["models"][:1]
    config["ensembles"] = [
        {
            "name": "pair_logits",
            "members": ["small", wide["grpc"]],
            "weights": [1.0, 3.0],
            "combine": "mean_logits",
        },
        {"name": "pair_probs", "members": ["small", wide["http"]], "combine": "mean_probs"},
    ]
    config["remote"] = {"token": TOKEN, **remote}
    return config


@pytest.fixture(scope="module")
def member(teachers: dict[str, Any]) -> Iterator[ServerThread]:
    """The member server: both teachers, behind a token."""
    config = teacher_config(teachers, auth_token=TOKEN)
    config["ensembles"] = []
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def wide(member: ServerThread) -> dict[str, str]:
    """The member's `wide` as a remote member URL, per transport."""
    return {
        "grpc": f"{member.endpoints.grpc_url}/wide",
        "http": f"{member.endpoints.http_url}/wide",
    }


@pytest.fixture(scope="module")
def front(teachers: dict[str, Any], wide: dict[str, str]) -> Iterator[ServerThread]:
    with running_server(front_config(teachers, wide)) as running:
        yield running


@pytest.fixture(params=["http", "grpc"])
def front_url(request: pytest.FixtureRequest, front: ServerThread) -> str:
    return front.endpoints.http_url if request.param == "http" else front.endpoints.grpc_url


def test_remote_members_combine_like_local_ones(
    front_url: str, teachers: dict[str, Any], wide: dict[str, str]
) -> None:
    images = random_images(4, 32, seed=5)
    small = in_process(teachers["small"], images)
    far = in_process(teachers["wide"], images)
    mean_logits = (1.0 * small + 3.0 * far) / 4.0
    mean_probs = torch.log((small.softmax(-1) + far.softmax(-1)) / 2.0)
    with TeacherClient.connect(front_url) as client:
        reply = client.request(images, model="pair_logits")
        assert reply.logits is not None
        assert (reply.logits - mean_logits).abs().max().item() < TOL
        assert reply.parts[0].members == ("small", wide["grpc"])
        reply = client.request(images, model="pair_probs")
        assert reply.logits is not None
        assert (reply.logits - mean_probs).abs().max().item() < TOL
        assert reply.parts[0].members == ("small", wide["http"])
        tempered = client.infer(images, model="pair_probs", temperature=4.0)
        assert (tempered - mean_probs / 4.0).abs().max().item() < TOL
        mix = {"mode": "mixup", "perm": [1, 2, 3, 0], "lam": 0.3}
        mixed = client.infer(images, model="pair_logits", mix=Mix("mixup", (1, 2, 3, 0), lam=0.3))
    expected = (
        in_process(teachers["small"], images, mix) + 3 * in_process(teachers["wide"], images, mix)
    ) / 4
    assert (mixed - expected).abs().max().item() < TOL


def test_the_answer_is_the_combination_of_what_each_server_answers(
    front: ServerThread, member: ServerThread
) -> None:
    images = random_images(4, 32, seed=6)
    with TeacherClient.connect(front.endpoints.grpc_url) as client:
        small = client.infer(images, model="small")
        pair = [client.infer(images, model=name) for name in ("pair_logits", "pair_probs")]
    with TeacherClient.connect(member.endpoints.grpc_url, token=TOKEN) as client:
        far = client.infer(images, model="wide")
    assert torch.equal(pair[0], combine_members([small, far], [1.0, 3.0], "mean_logits"))
    assert torch.equal(pair[1], combine_members([small, far], [1.0, 1.0], "mean_probs"))


def test_described_with_the_remote_members(front: ServerThread, wide: dict[str, str]) -> None:
    with TeacherClient.connect(front.endpoints.http_url) as client:
        by_name = {info.name: info for info in client.list_models()}
    assert set(by_name) == {"small", "pair_logits", "pair_probs"}
    pair = by_name["pair_logits"]
    assert pair.members == ("small", wide["grpc"]) and pair.combine == "mean_logits"
    assert pair.input_size == (40, 40) and pair.num_classes == 10


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_open_inference_protocol_answers_name_the_members(
    front: ServerThread, wide: dict[str, str], transport: str
) -> None:
    images = random_images(2, 32, seed=7)
    if transport == "http":
        client: Any = thttp.InferenceServerClient(front.endpoints.http_url.split("://")[1])
        tensor = thttp.InferInput("images", list(images.shape), "UINT8")
    else:
        client = tgrpc.InferenceServerClient(front.endpoints.grpc_url.split("://")[1])
        tensor = tgrpc.InferInput("images", list(images.shape), "UINT8")
    try:
        tensor.set_data_from_numpy(images.numpy())
        answer = client.infer("pair_probs", [tensor])
        response = answer.get_response() if transport == "http" else answer.get_response(True)
        members = response["parameters"]["members"]
        assert (members if transport == "http" else members["string_param"]) == (
            f"small,{wide['http']}"
        )
        metadata = client.get_model_metadata("pair_probs")
        shape = metadata["inputs"][0]["shape"] if transport == "http" else None
        assert shape is None or [int(d) for d in shape] == [-1, 3, 40, 40]
    finally:
        client.close()


def test_an_ensemble_of_remote_members_only(teachers: dict[str, Any], member: ServerThread) -> None:
    config = teacher_config(teachers)
    config["models"] = []
    members = [f"{member.endpoints.http_url}/small", f"{member.endpoints.grpc_url}/wide"]
    config["ensembles"] = [{"name": "far", "members": members, "weights": [1.0, 3.0]}]
    config["remote"] = {"token": TOKEN}
    images = random_images(3, 32, seed=8)
    expected = (
        in_process(teachers["small"], images) + 3 * in_process(teachers["wide"], images)
    ) / 4
    with running_server(config) as front, TeacherClient.connect(front.endpoints.grpc_url) as client:
        assert [info.name for info in client.list_models()] == ["far"]
        reply = client.request(images, model="far")
    assert reply.logits is not None and reply.parts[0].members == tuple(members)
    assert (reply.logits - expected).abs().max().item() < TOL


def test_a_member_behind_a_grpc_target_of_replicas_is_spread_and_fails_over(
    teachers: dict[str, Any], member: ServerThread
) -> None:
    """`ipv4:A,B/wide`: one member served by two replicas. The front's requests reach both
    (round robin), each answer is the in-process one, and with one replica stopped the other
    answers everything."""
    replica_config = teacher_config(teachers, auth_token=TOKEN)
    replica_config["ensembles"] = []
    images = random_images(4, 40, seed=9)
    expected = in_process(teachers["wide"], images)
    with contextlib.ExitStack() as stack:
        replica_running = stack.enter_context(contextlib.ExitStack())
        replica = replica_running.enter_context(running_server(replica_config))
        servers = (member, replica)
        ports = [s.endpoints.grpc_port for s in servers]
        ensemble = {
            "name": "far",
            "members": [f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/wide"],
        }
        config = {**teacher_config(teachers), "models": [], "ensembles": [ensemble]}
        config["remote"] = {"token": TOKEN}
        front = stack.enter_context(running_server(config))
        client = stack.enter_context(TeacherClient.connect(front.endpoints.grpc_url))
        before = [model_stats(s)["wide"]["requests"].get("ok", 0) for s in servers]
        sent = 0

        def both_answered() -> bool:
            nonlocal sent
            assert (client.infer(images, model="far") - expected).abs().max().item() < TOL
            sent += 1
            served = [
                model_stats(s)["wide"]["requests"].get("ok", 0) - b
                for s, b in zip(servers, before, strict=True)
            ]
            assert sum(served) == sent, served  # each request reached one replica once
            return all(n > 0 for n in served)

        # round robin over the replicas that are ready: the second joins once connected
        wait_until(
            both_answered, "both replicas to answer the front", timeout_s=60, interval_s=0.05
        )
        served = [
            model_stats(s)["wide"]["requests"].get("ok", 0) - b
            for s, b in zip(servers, before, strict=True)
        ]
        replica_running.close()  # the replica drains and stops; the member's other one is left
        for _ in range(4):
            assert (client.infer(images, model="far") - expected).abs().max().item() < TOL
    assert model_stats(member)["wide"]["requests"]["ok"] - before[0] == served[0] + 4, (
        "with one replica stopped, the other answers every request"
    )


def test_a_slow_member_is_unavailable_by_name(
    teachers: dict[str, Any], strict_server: ServerThread
) -> None:
    """The strict server's slow model, kept busy: no answer within remote.timeout_s."""
    config = teacher_config(teachers)
    slow = f"{strict_server.endpoints.grpc_url}/slow"
    config["models"] = config["models"][:1]
    config["ensembles"] = [{"name": "late", "members": ["small", slow]}]
    config["remote"] = {"token": TOKEN, "timeout_s": 0.2}
    with running_server(config) as front:
        busy = occupy_slow_model(strict_server, 60)
        try:
            fields = {
                "images": tensor_map(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
                "client_id": BUSY_CLIENT,  # forwarded: the member batches it behind the busy one
            }
            response = post(front, fields, model="late")
        finally:
            busy.join()
        assert response.status_code == 503, response.text
        message = response.json()["error"]["message"]
        assert slow in message and "no answer in 0.20s" in message
        with TeacherClient.connect(front.endpoints.http_url, retry=ONCE) as client:
            client.infer(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), model="late")


def test_a_wrong_or_missing_token_stops_the_front_from_starting(
    teachers: dict[str, Any], wide: dict[str, str]
) -> None:
    for remote in ({"token": "wrong"}, {"token": None}):
        config = front_config(teachers, wide, connect_timeout_s=2)
        config["remote"].update(remote)
        with (
            running_server(config, wait_ready=False) as front,
            pytest.raises(ModelLoadError, match="did not say what it serves") as error,
        ):
            front.wait_ready()
        assert wide["grpc"] in str(error.value) and "token" in str(error.value).lower()


def test_a_member_that_never_comes_stops_the_front_from_starting(
    teachers: dict[str, Any],
) -> None:
    with refusing_port() as port:
        config = front_config(
            teachers,
            {"grpc": f"grpc://127.0.0.1:{port}/wide", "http": f"http://127.0.0.1:{port}/wide"},
            connect_timeout_s=1,
        )
        with (
            running_server(config, wait_ready=False) as front,
            pytest.raises(ModelLoadError, match=f"127.0.0.1:{port}/wide did not say"),
        ):
            front.wait_ready()


def test_members_that_disagree_on_classes_stop_the_front(teachers: dict[str, Any]) -> None:
    five = {
        "name": "five",
        "arch": "kdserve:resnet8",
        "random_init": True,
        "num_classes": 5,
        "input_size": 32,
    }
    with running_server({"server": {"http_port": 0, "grpc_port": 0}, "models": [five]}) as other:
        config = teacher_config(teachers)
        config["models"] = config["models"][:1]
        config["ensembles"] = [
            {"name": "odd", "members": ["small", f"{other.endpoints.grpc_url}/five"]}
        ]
        with (
            running_server(config, wait_ready=False) as front,
            pytest.raises(
                ModelLoadError, match=r"'odd' members disagree on num_classes: \[5, 10\]"
            ),
        ):
            front.wait_ready()


def test_a_token_in_clear_text_off_loopback_is_refused(teachers: dict[str, Any]) -> None:
    far = {"grpc": "grpc://192.0.2.1:50051/wide", "http": "http://192.0.2.1:8000/wide"}
    with (
        running_server(front_config(teachers, far), wait_ready=False) as front,
        pytest.raises(ModelLoadError, match="clear text"),
    ):
        front.wait_ready()


def member_process(root: Path, teachers: dict[str, Any]) -> TeacherProcess:
    config = teacher_config(teachers, threads_per_replica=1)
    config["models"] = config["models"][1:]
    config["ensembles"] = []
    return TeacherProcess(root, config, name="member")


def families(server: ServerThread) -> dict[str, Any]:
    page = httpx.get(f"{server.endpoints.http_url}/metrics", headers=AUTH).text
    return {family.name: family for family in text_string_to_metric_families(page)}


@pytest.mark.slow
def test_killing_a_member_mid_run_and_its_recovery(
    tmp_path: Path, teachers: dict[str, Any]
) -> None:
    """`strict` needs both members (asked over HTTP); `quorum` (asked over gRPC) answers
    from one and says so; both recover when the member is back."""
    process = member_process(tmp_path, teachers)
    process.start()
    try:
        process.wait_ready()
        far, far_http = f"{process.url('grpc')}/wide", f"{process.url('http')}/wide"
        config = teacher_config(teachers)
        config["models"] = config["models"][:1]
        config["ensembles"] = [
            {"name": "strict", "members": ["small", far_http]},
            {"name": "quorum", "members": ["small", far], "quorum": 1},
        ]
        config["remote"] = {"timeout_s": 10}
        images = random_images(2, 32, seed=9)
        small = in_process(teachers["small"], images)
        both = (small + in_process(teachers["wide"], images)) / 2
        with running_server(config) as front:
            url = front.endpoints.grpc_url
            answered: list[tuple[str, ...]] = []
            failed: list[Exception] = []
            stop = threading.Event()

            def ask_quorum() -> None:
                with TeacherClient.connect(url, model="quorum", retry=ONCE) as client:
                    while not stop.is_set():
                        try:
                            reply = client.request(images)
                        except Exception as exc:
                            failed.append(exc)
                        else:
                            answered.append(reply.parts[0].members)

            asking = threading.Thread(target=ask_quorum)
            asking.start()
            try:
                wait_until(lambda: len(answered) >= 3, "answers from both members")
                assert answered[0] == ("small", far)
                process.kill()
                wait_until(lambda: ("small",) in answered, "an answer from the quorum")
                with TeacherClient.connect(url, model="quorum", retry=ONCE) as client:
                    alone = client.request(images)
                assert alone.logits is not None and alone.parts[0].members == ("small",)
                assert (alone.logits - small).abs().max().item() < TOL
                fields = {"images": tensor_map(images)}
                response = post(front, fields, model="strict")
                assert response.status_code == 503, response.text
                assert far_http in response.json()["error"]["message"]
                error = grpc_call(front, {"model": "strict", "images": tensor_map(images)})
                assert error is not None and error.code().name == "UNAVAILABLE"  # type: ignore[attr-defined]
                assert far_http in error.details()  # type: ignore[attr-defined]
                with (
                    TeacherClient.connect(url, model="strict", retry=ONCE) as client,
                    pytest.raises(NotReady, match="is unavailable"),
                ):
                    client.infer(images)
                process.start()
                process.wait_ready()
                answered.clear()
                wait_until(lambda: ("small", far) in answered, "the member back in the quorum")
            finally:
                stop.set()
                asking.join()
            assert not failed, f"the quorum ensemble failed while a member was away: {failed[:3]}"
            with TeacherClient.connect(url, model="strict", retry=ONCE) as client:
                back = client.request(images)
            assert back.logits is not None and back.parts[0].members == ("small", far_http)
            assert (back.logits - both).abs().max().item() < TOL
            metrics = families(front)
        failures = {
            (s.labels["model"], s.labels["member"], s.labels["reason"]): s.value
            for s in metrics["kdserve_member_failures"].samples
        }
        assert failures[("strict", far_http, "not_ready")] >= 3
        assert failures[("quorum", far, "not_ready")] >= 1
        assert not any(member == "small" for _, member, _ in failures)
        partial = {
            s.labels["model"]: s.value for s in metrics["kdserve_ensemble_partial_answers"].samples
        }
        assert partial["quorum"] >= 1 and partial["strict"] == 0
        counts = {
            (s.labels["model"], s.labels["member"]): s.value
            for s in metrics["kdserve_member_seconds"].samples
            if s.name == "kdserve_member_seconds_count"
        }
        assert counts[("strict", far_http)] >= 4 and counts[("quorum", far)] >= 3
    finally:
        process.stop()
