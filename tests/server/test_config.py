"""Config: YAML + env + CLI precedence, relative paths, and errors that name the field and value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from teacher_server.server.config import EnsembleConfig, RemoteConfig, ServerConfig, load_config
from teacher_server.shared.settings import ConfigError

MODEL = {
    "name": "t",
    "arch": "kdserve:resnet8",
    "random_init": True,
    "num_classes": 10,
    "input_size": 32,
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_square_input_size(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"models": [MODEL]}), environ={})
    assert config.server.host == "127.0.0.1"
    assert config.server.devices == ["cpu"]
    assert config.models[0].input_size == (32, 32)
    assert config.server.auth_token is None


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": {"max_batch_size": 8, "max_delay_ms": 3}, "models": [MODEL]})
    env = {
        "KDSERVE_SERVER__MAX_BATCH_SIZE": "16",
        "KDSERVE_SERVER__MAX_DELAY_MS": "7",
        "KDSERVE_AUTH_TOKEN": "s3cr3t-value",
    }
    config = load_config(path, server_overrides={"max_batch_size": 32, "host": None}, environ=env)
    assert config.server.max_batch_size == 32
    assert config.server.max_delay_ms == 7
    assert (
        config.server.auth_token is not None
        and config.server.auth_token.get_secret_value() == "s3cr3t-value"
    )
    assert "s3cr3t-value" not in repr(config)


def test_relative_weights_resolve_against_the_file(tmp_path: Path) -> None:
    model = {**MODEL, "random_init": False, "weights": "w/teacher.safetensors"}
    config = load_config(write(tmp_path, {"models": [model]}), environ={})
    assert config.models[0].weights == tmp_path / "w" / "teacher.safetensors"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"num_classes": -3}, "models.0.num_classes"),
        ({"dtype": "float64"}, "models.0.dtype"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be > 0"),
        ({"input_size": [0, 32]}, "input_size must be positive"),
        ({"random_init": False}, "has no weights"),
        ({"colour": "red"}, "models.0.colour"),
    ],
)
def test_bad_model_fields_are_named(
    tmp_path: Path, change: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {"models": [{**MODEL, **change}]}), environ={})
    assert expected in str(info.value)
    assert str(tmp_path / "teacher.yaml") in str(info.value)


def test_bad_server_and_ensemble_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server.max_batch_size.*got 0"):
        load_config(
            write(tmp_path, {"server": {"max_batch_size": 0}, "models": [MODEL]}), environ={}
        )
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N, got 'tpu'"):
        load_config(write(tmp_path, {"server": {"device": "tpu"}, "models": [MODEL]}), environ={})
    with pytest.raises(ConfigError, match=r"unknown members \['ghost'\]"):
        load_config(
            write(
                tmp_path,
                {"models": [MODEL], "ensembles": [{"name": "e", "members": ["t", "ghost"]}]},
            ),
            environ={},
        )
    with pytest.raises(ConfigError, match="2 members but 1 weights"):
        load_config(
            write(
                tmp_path,
                {
                    "models": [MODEL, {**MODEL, "name": "u"}],
                    "ensembles": [{"name": "e", "members": ["t", "u"], "weights": [1]}],
                },
            ),
            environ={},
        )
    with pytest.raises(ConfigError, match="disagree on num_classes"):
        load_config(
            write(
                tmp_path,
                {
                    "models": [MODEL, {**MODEL, "name": "u", "num_classes": 5}],
                    "ensembles": [{"name": "e", "members": ["t", "u"]}],
                },
            ),
            environ={},
        )
    with pytest.raises(ConfigError, match=r"unique.*\['t'\]"):
        load_config(write(tmp_path, {"models": [MODEL, MODEL]}), environ={})


def test_pass_sizes_are_sorted_and_checked_against_the_largest_pass(tmp_path: Path) -> None:
    server = {"max_batch_size": 64}
    config = load_config(
        write(tmp_path, {"server": server, "models": [{**MODEL, "pass_sizes": [64, 8, 32, 8]}]}),
        environ={},
    )
    assert config.models[0].pass_sizes == (8, 32, 64)
    cases = [
        ({"pass_sizes": [8, 32]}, server, r"largest of pass_sizes \[8, 32\] must hold.*64"),
        ({"pass_sizes": [0, 64]}, server, "pass sizes must be positive"),
        ({"pass_sizes": [*range(1, 10), 64]}, server, "at most 8 pass sizes"),
        ({"cuda_graphs": True}, server, "cuda_graphs needs pass_sizes"),
        ({"cuda_graphs": True, "pass_sizes": [64]}, server, r"needs CUDA devices.*\['cpu'\]"),
        (
            {"cuda_graphs": True, "compile": True, "pass_sizes": [64]},
            {**server, "device": "cuda"},
            "choose compile or cuda_graphs",
        ),
    ]
    for change, server_fields, expected in cases:
        data = {"server": server_fields, "models": [{**MODEL, **change}]}
        with pytest.raises(ConfigError, match=expected):
            load_config(write(tmp_path, data), environ={})
    graphs = {**MODEL, "cuda_graphs": True, "pass_sizes": [16, 64]}
    on_gpu = load_config(
        write(tmp_path, {"server": {**server, "device": "cuda:0"}, "models": [graphs]}), environ={}
    )
    assert on_gpu.models[0].cuda_graphs and on_gpu.models[0].pinned_upload


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (["t", "ftp://host:1/t"], "must start with one of grpc://, grpcs://, http://, https://"),
        (["t", "grpc://host/t"], "needs a host and a port"),
        (["t", "grpc://:50051/t"], "needs a host and a port"),
        (["t", "grpc://host:notaport/t"], "remote member 'grpc://host:notaport/t'"),
        (["t", "grpc://host:1"], "must end with /model"),
        (["t", "grpc://host:1/a/b"], "must end with /model"),
        (["t", "grpc://user:pw@host:1/t"], "no user, query or fragment"),
        (["t", "http://host:1/t?x=1"], "no user, query or fragment"),
        (["t", "grpc://host:1/t", "grpc://host:1/t"], "listed more than once"),
        (["t", "ghost"], "a remote member is scheme://host:port/model"),
        (["t", "dns:///host:1"], "must end with /model"),
        (["t", "dns:///host/t"], "'host' needs a host and a port"),
        (["t", "ipv4:host:1/t"], "is not an ipv4 address:port"),
        (["t", "grpcs+ipv4:10.0.0.1:1,10.0.0.2:1/t"], "name them grpcs+dns:///name:port"),
    ],
)
def test_bad_remote_members_are_named(tmp_path: Path, members: list[str], expected: str) -> None:
    data = {"models": [MODEL], "ensembles": [{"name": "e", "members": members}]}
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(tmp_path, data), environ={})


def test_remote_members_quorum_and_token(tmp_path: Path) -> None:
    far = "grpcs://teacher-b.example:50051/vit"
    ensemble = {"name": "e", "members": ["t", far], "quorum": 1}
    config = load_config(
        write(tmp_path, {"models": [MODEL], "ensembles": [ensemble], "remote": {"token": "a"}}),
        environ={"KDSERVE_REMOTE_TOKEN": "from-env"},
    )
    (parsed,) = config.ensembles
    assert parsed.local_members == ["t"] and parsed.needed == 1
    (remote,) = parsed.remote_members
    assert (remote.url, remote.endpoint, remote.model) == (
        far,
        "grpcs://teacher-b.example:50051",
        "vit",
    )
    replicas = "grpcs+dns:///teacher-b.example:50051/vit"
    (balanced,) = EnsembleConfig(name="b", members=[replicas]).remote_members
    assert (balanced.endpoint, balanced.model) == ("grpcs+dns:///teacher-b.example:50051", "vit")
    # a local model may be named like a gRPC name scheme: only "scheme:" makes a target
    assert EnsembleConfig(name="u", members=["unix", "dns"]).local_members == ["unix", "dns"]
    token = config.remote.token
    assert token is not None and token.get_secret_value() == "from-env"
    assert "from-env" not in repr(config)
    assert config.max_images("e") == config.max_images("t")  # the remote member costs no pixels
    only_remote = {"ensembles": [{"name": "far", "members": [far]}]}
    assert load_config(write(tmp_path, only_remote), environ={}).models == []
    with pytest.raises(ConfigError, match="quorum 3 but 2 members"):
        load_config(
            write(tmp_path, {"models": [MODEL], "ensembles": [{**ensemble, "quorum": 3}]}),
            environ={},
        )
    with pytest.raises(ConfigError, match="nothing to serve"):
        load_config(write(tmp_path, {"models": [], "ensembles": []}), environ={})
    with pytest.raises(ConfigError, match=r"tls_cert and remote\.tls_key go together"):
        load_config(
            write(
                tmp_path,
                {"models": [MODEL], "remote": {"tls_cert": str(tmp_path / "teacher.yaml")}},
            ),
            environ={},
        )


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad, environ={})


def test_device_list_from_env(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, {"models": [MODEL]}), environ={"KDSERVE_SERVER__DEVICE": "cuda:0,cuda:1"}
    )
    assert config.server.devices == ["cuda:0", "cuda:1"]


def test_the_documented_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "teacher.yaml"
    config = load_config(example, environ={})
    assert [m.name for m in config.models] == ["resnet8x4", "wrn_40_2"]
    assert config.ensembles[0].combine == "mean_probs"
    assert config.server.cpu_threads() is not None
    listed = set(yaml.safe_load(example.read_text())["server"]) | {"auth_token"}
    assert listed == set(ServerConfig.model_fields), "the example lists every server field"
    assert config.server == ServerConfig(), "the example shows the defaults"
    raw = yaml.safe_load(example.read_text())
    assert set(raw["remote"]) | {"token"} == set(RemoteConfig.model_fields)
    assert config.remote == RemoteConfig(), "the example shows the remote defaults"
    assert set(raw["ensembles"][0]) == set(EnsembleConfig.model_fields)
