"""Config: YAML + env + CLI precedence, relative paths, and errors that name the field and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from teacher_server.server.config import ServerConfig, load_config
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
