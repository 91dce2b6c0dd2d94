"""TLS on both transports, with certificates made at test time (trustme): HTTPS and grpcs,
mutual TLS, tritonclient over TLS, a student run over grpcs, and tokens kept off clear text."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trustme

from student_worker.config import load_run_config
from student_worker.runlog import RunLog
from student_worker.trainer import Trainer
from teacher_server.client import RetryPolicy, TeacherClient
from teacher_server.client.connections import Unreachable
from teacher_server.client.tls import ClientTls
from teacher_server.server.config import load_config
from teacher_server.server.serve import ServerThread
from teacher_server.shared.errors import Unauthenticated
from teacher_server.shared.net import is_loopback
from tests.helpers import TOKEN, in_process, random_images, running_server, teacher_config

NO_RETRY = RetryPolicy(attempts=0)
"""For the calls that must fail: a refused handshake is not retried for seconds."""

TOL = 1e-4


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed none of these: a client trusting it must refuse the server."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("student-1@kdserve.test")
    paths = Pki(*(root / name for name in ("ca", "cert", "key", "ccert", "ckey", "other")))
    ca.cert_pem.write_to_path(str(paths.ca))
    server.cert_chain_pems[0].write_to_path(str(paths.cert))
    server.private_key_pem.write_to_path(str(paths.key))
    client.cert_chain_pems[0].write_to_path(str(paths.client_cert))
    client.private_key_pem.write_to_path(str(paths.client_key))
    other.cert_pem.write_to_path(str(paths.other_ca))
    return paths


@pytest.fixture(scope="module")
def tls_server(teachers: dict[str, Any], pki: Pki) -> Iterator[ServerThread]:
    tls = {"tls_cert": str(pki.cert), "tls_key": str(pki.key), "auth_token": TOKEN}
    with running_server(teacher_config(teachers, **tls)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(teachers: dict[str, Any], pki: Pki) -> Iterator[ServerThread]:
    tls = {"tls_cert": str(pki.cert), "tls_key": str(pki.key), "tls_client_ca": str(pki.ca)}
    with running_server(teacher_config(teachers, **tls)) as server:
        yield server


def urls(server: ServerThread) -> list[str]:
    return [server.endpoints.http_url, server.endpoints.grpc_url]


def test_endpoints_say_https_and_grpcs(tls_server: ServerThread) -> None:
    assert tls_server.endpoints.http_url.startswith("https://127.0.0.1:")
    assert tls_server.endpoints.grpc_url.startswith("grpcs://127.0.0.1:")


def test_served_logits_over_tls_equal_in_process(
    tls_server: ServerThread, teachers: dict[str, Any], pki: Pki
) -> None:
    images = random_images(4, 32, seed=2)
    expected = in_process(teachers["small"], images)
    for url in urls(tls_server):
        with TeacherClient.connect(url, token=TOKEN, tls=ClientTls(ca=pki.ca)) as client:
            served = client.infer(images, model="small")
        assert (served - expected).abs().max().item() < TOL, url


def test_a_grpc_target_over_tls(
    tls_server: ServerThread, teachers: dict[str, Any], pki: Pki
) -> None:
    """`grpcs+` in front of a gRPC target: TLS, verified against the CA, the server's name
    checked (the certificate names localhost and 127.0.0.1)."""
    images = random_images(2, 32, seed=4)
    expected = in_process(teachers["small"], images)
    port = tls_server.endpoints.grpc_port
    for url in (f"grpcs+dns:///localhost:{port}", f"grpcs+ipv4:127.0.0.1:{port}"):
        with TeacherClient.connect(url, token=TOKEN, tls=ClientTls(ca=pki.ca)) as client:
            served = client.infer(images, model="small")
        assert (served - expected).abs().max().item() < TOL, url
    with (
        TeacherClient.connect(
            f"grpcs+dns:///localhost:{port}",
            token=TOKEN,
            tls=ClientTls(ca=pki.other_ca),
            retry=NO_RETRY,
        ) as client,
        pytest.raises(Unreachable),
    ):
        client.infer(images, model="small")
    several = f"grpcs+ipv4:127.0.0.1:{port},127.0.0.1:{port}"
    with pytest.raises(ValueError, match="several addresses"):
        TeacherClient.connect(several, tls=ClientTls(ca=pki.ca))
    named = ClientTls(ca=pki.ca, server_name="localhost")
    with TeacherClient.connect(several, token=TOKEN, tls=named) as client:
        served = client.infer(images, model="small")
    assert (served - expected).abs().max().item() < TOL
    with pytest.raises(ValueError, match="server name is for gRPC"):
        TeacherClient.connect(f"https://127.0.0.1:{port}", tls=named)
    with pytest.raises(ValueError, match=r"use grpcs\+dns:///localhost"):
        TeacherClient.connect(f"dns:///localhost:{port}", tls=ClientTls(ca=pki.ca))


def test_a_client_refuses_a_server_it_cannot_verify(tls_server: ServerThread, pki: Pki) -> None:
    images = random_images(1, 32)
    for url in urls(tls_server):
        with (
            TeacherClient.connect(
                url, token=TOKEN, tls=ClientTls(ca=pki.other_ca), retry=NO_RETRY
            ) as client,
            pytest.raises(Unreachable),
        ):
            client.infer(images, model="small")


def test_clear_text_to_a_tls_port_gets_no_answer(tls_server: ServerThread) -> None:
    for url in urls(tls_server):
        clear = url.replace("https://", "http://").replace("grpcs://", "grpc://")
        with (
            TeacherClient.connect(clear, token=TOKEN, retry=NO_RETRY) as client,
            pytest.raises(Unreachable),
        ):
            client.infer(random_images(1, 32), model="small")


def test_the_token_is_still_checked_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    for url in urls(tls_server):
        with (
            TeacherClient.connect(url, tls=ClientTls(ca=pki.ca)) as client,
            pytest.raises(Unauthenticated),
        ):
            client.infer(random_images(1, 32), model="small")


def test_mutual_tls_needs_a_client_certificate(mtls_server: ServerThread, pki: Pki) -> None:
    images = random_images(2, 32)
    mutual = ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    for url in urls(mtls_server):
        with (
            TeacherClient.connect(url, tls=ClientTls(ca=pki.ca), retry=NO_RETRY) as client,
            pytest.raises(Unreachable),
        ):
            client.infer(images, model="small")
        with TeacherClient.connect(url, tls=mutual) as client:
            assert client.infer(images, model="small").shape == (2, 10)


def test_tritonclient_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    images = random_images(2, 32).numpy()
    grpc_client = tgrpc.InferenceServerClient(
        tls_server.endpoints.grpc_url.removeprefix("grpcs://"),
        ssl=True,
        root_certificates=str(pki.ca),
    )
    http_client = thttp.InferenceServerClient(
        tls_server.endpoints.http_url.removeprefix("https://"),
        ssl=True,
        ssl_options={"ca_certs": str(pki.ca)},
    )
    for module, client in ((tgrpc, grpc_client), (thttp, http_client)):
        tensor = module.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        answer = client.infer("small", [tensor], headers={"authorization": f"Bearer {TOKEN}"})
        assert answer.as_numpy("logits").shape == (2, 10)
        assert np.isfinite(answer.as_numpy("logits")).all()
        client.close()


def test_a_student_trains_over_grpcs(tls_server: ServerThread, pki: Pki, tmp_path: Path) -> None:
    config = load_run_config(
        None,
        {
            "teacher.endpoints": [tls_server.endpoints.grpc_url],
            "teacher.model": "small",
            "teacher.token": TOKEN,
            "teacher.tls_ca": str(pki.ca),
            "batch_size": 16,
            "max_steps": 3,
            "output_dir": str(tmp_path / "run"),
            "threads": 1,
        },
    )
    metrics = Trainer(config).fit()
    assert 0.0 <= metrics["train_agreement"] <= 1.0  # the teacher answered the evaluation too
    assert [r["step"] for r in RunLog(tmp_path / "run").records("train")][-1] == 3


def test_a_token_is_never_sent_in_clear_text_off_loopback() -> None:
    for url in ("http://10.1.2.3:8000", "grpc://teacher.example:50051"):
        with pytest.raises(ValueError, match="clear text"):
            TeacherClient.connect(url, token=TOKEN)
        TeacherClient.connect(url, token=TOKEN, allow_insecure_token=True).close()
        TeacherClient.connect(url).close()  # no token, nothing to protect
    for url in ("http://127.0.0.1:8000", "grpc://localhost:50051", "http://[::1]:8000"):
        TeacherClient.connect(url, token=TOKEN).close()
    with pytest.raises(ValueError, match="clear text"):
        load_run_config(
            None, {"teacher.endpoints": ["grpc://10.0.0.7:50051"], "teacher.token": "t"}
        )
    assert is_loopback("127.0.0.2") and not is_loopback("teacher")


def test_bad_tls_settings_are_config_errors(
    pki: Pki, tmp_path: Path, teachers: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="key"):
        ClientTls(cert=pki.client_cert)
    with pytest.raises(ValueError, match="does not exist"):
        ClientTls(ca=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="clear text"):
        TeacherClient.connect("http://127.0.0.1:8000", tls=ClientTls(ca=pki.ca))
    cases = [
        ({"tls_cert": str(pki.cert)}, "tls_key"),
        ({"tls_key": str(pki.key)}, "tls_cert"),
        ({"tls_client_ca": str(pki.ca)}, "tls_cert"),
        ({"tls_cert": str(tmp_path / "none.pem"), "tls_key": str(pki.key)}, "does not exist"),
    ]
    for server, message in cases:
        with pytest.raises(ValueError, match=message):
            load_config(data=teacher_config(teachers, **server), environ={})


def test_server_warns_about_a_token_in_clear_text_off_loopback(
    teachers: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    raw = teacher_config(teachers, host="0.0.0.0", auth_token=TOKEN)
    config = load_config(data=raw, environ={})
    with caplog.at_level("WARNING"), ServerThread(config):
        pass
    assert any("clear text" in record.getMessage() for record in caplog.records)
