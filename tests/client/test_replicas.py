"""Teacher replicas behind one gRPC target (grpcio's round_robin with health checks): the
targets' forms, and three servers on 127.0.0.1, .2 and .3, one of them draining. Replicas
killed and added under eight students: tests/deploy/test_scale_out.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from student_worker.config import load_run_config
from teacher_server.client import RetryPolicy, TeacherClient
from teacher_server.server.config import load_config
from teacher_server.server.serve import ServerThread
from teacher_server.shared.endpoints import parse_endpoint
from tests.archives import save_slow
from tests.helpers import (
    SLOW_BATCH,
    in_process,
    model_stats,
    occupy_slow_model,
    random_images,
    teacher_config,
    wait_until,
)

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
TOL = 1e-4
CLIENT_LOG = "teacher_server.client.teacher_client"


def test_grpc_targets_name_every_address() -> None:
    cases = {
        "dns:///teacher:50051": ("teacher",),
        "dns://10.0.0.53/teacher.lab:50051": ("teacher.lab", "10.0.0.53"),
        "dns:///[::1]:50051": ("::1",),
        "ipv4:127.0.0.2:1,127.0.0.3:2": ("127.0.0.2", "127.0.0.3"),
        "ipv6:[::1]:50051,[fd00::2]:50051": ("::1", "fd00::2"),
        "unix:/run/teacher.sock": ("localhost",),
        "grpcs+dns:///teacher:50051": ("teacher",),
    }
    for url, hosts in cases.items():
        endpoint = parse_endpoint(url)
        assert (endpoint.transport, endpoint.balanced, endpoint.hosts) == ("grpc", True, hosts)
        assert endpoint.secure == url.startswith("grpcs+")
    one = parse_endpoint("grpc://teacher:50051")
    assert not one.balanced and one.address == "teacher:50051"
    for bad, message in (
        ("dns:///teacher", "needs a host and a port"),
        ("ipv4:127.0.0.2:1,127.0.0.3", "needs a host and a port"),
        ("unix:", "socket path"),
        ("grpcs+grpc://teacher:1", "is not one of"),
        ("teacher:50051", "is not one of"),
        ("grpc://teacher", "needs a host and a port"),
        ("ipv6:::1:50051", "is not an ipv6"),
        ("ipv4:localhost:50051", "is not an ipv4"),
        ("ipv4:127.0.0.1:99999", "not in 1-65535"),
        ("dns://localhost:50051", "three slashes"),
        ("ipv4:127.0.0.1:1, 127.0.0.2:2", "needs a host and a port"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_endpoint(bad)


def test_a_target_is_a_student_endpoint_and_keeps_the_token_rule() -> None:
    ok = load_run_config(None, {"teacher.endpoints": ["ipv4:127.0.0.2:1,127.0.0.3:1"]})
    assert ok.teacher.endpoints == ["ipv4:127.0.0.2:1,127.0.0.3:1"]
    load_run_config(None, {"teacher.endpoints": ["dns:///localhost:50051"], "teacher.token": "t"})
    with pytest.raises(ValueError, match=r"clear text to '10\.0\.0\.3'"):
        load_run_config(
            None,
            {"teacher.endpoints": ["ipv4:127.0.0.2:1,10.0.0.3:1"], "teacher.token": "t"},
        )
    with pytest.raises(ValueError, match="is not one of"):
        load_run_config(None, {"teacher.endpoints": ["teacher:50051"]})
    with pytest.raises(ValueError, match="clear text"):
        TeacherClient.connect("dns:///teacher.lab:50051", token="t")
    with pytest.raises(ValueError, match="clear text"):  # the resolver could answer anything
        TeacherClient.connect("dns://10.0.0.53/localhost:50051", token="t")
    TeacherClient.connect("grpcs+dns:///teacher.lab:50051", token="t").close()


def test_a_dns_target_reaches_a_teacher(server: Any, teachers: dict[str, Any]) -> None:
    images = random_images(2, 32, seed=1)
    url = f"dns:///localhost:{server.endpoints.grpc_port}"
    with TeacherClient.connect(url, model="small") as client:
        served = client.infer(images)
    assert torch.allclose(served, in_process(teachers["small"], images), atol=TOL, rtol=0)


def test_a_draining_replica_gets_no_new_requests(teachers: dict[str, Any], tmp_path: Path) -> None:
    """The health checks at work: a replica that is shutting down says NOT_SERVING at once
    (while it finishes a long request), and the target's channel stops sending to it, so
    requests with no retry at all still succeed."""
    config = teacher_config(
        teachers, max_batch_size=SLOW_BATCH, max_delay_ms=1, shutdown_grace_s=60
    )
    config["models"] = [
        config["models"][0],
        {
            "name": "slow",
            "arch": f"file:{save_slow(tmp_path / 'slow.pt', 120)}",
            "num_classes": 10,
            "input_size": 8,
        },
    ]
    config["ensembles"] = []
    servers = []
    for host in HOSTS:
        config["server"]["host"] = host
        servers.append(ServerThread(load_config(data=config, environ={})).start())
    draining = servers[0]
    stopping: threading.Thread | None = None
    long_one: threading.Thread | None = None
    try:
        url = "ipv4:" + ",".join(
            f"{host}:{s.endpoints.grpc_port}" for host, s in zip(HOSTS, servers, strict=True)
        )
        images = random_images(2, 32, seed=3)
        with TeacherClient.connect(url, model="small", retry=RetryPolicy(attempts=0)) as client:
            for _ in range(9):
                client.infer(images)
            assert all(model_stats(s)["small"]["requests"].get("ok", 0) > 0 for s in servers)
            long_one = occupy_slow_model(draining, 160)
            stopping = threading.Thread(target=draining.stop)
            stopping.start()
            wait_until(lambda: not ready(draining), "the replica to start draining")
            time.sleep(0.5)  # the health watch's NOT_SERVING reaches the client's channel
            before = model_stats(draining)["small"]["requests"]
            for _ in range(30):
                client.infer(images)
            assert model_stats(draining)["small"]["requests"] == before
            assert long_one.is_alive(), "the long request ended before the check did"
    finally:
        for server in servers[1:]:
            server.stop()
        for thread in (stopping, long_one):
            if thread is not None:
                thread.join()


def ready(server: ServerThread) -> bool:
    return httpx.get(f"{server.endpoints.http_url}/readyz", timeout=5).status_code == 200
