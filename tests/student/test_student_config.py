"""Student config: YAML + flags, the token from the environment, errors naming field and value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from student_worker.config import RunConfig, load_run_config
from teacher_server.shared.settings import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "student.yaml"


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field of a config model, nested ones dotted."""
    names = set()
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names |= fields(kind, f"{prefix}{name}.")
        else:
            names.add(prefix + name)
    return names


def keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    names = set()
    for name, value in data.items():
        nested = isinstance(value, dict) and name != "hyperparameters"
        names |= keys(value, f"{prefix}{name}.") if nested else {prefix + name}
    return names


def test_the_documented_example_config_lists_every_field() -> None:
    assert keys(yaml.safe_load(EXAMPLE.read_text())) == fields(RunConfig)
    config = load_run_config(EXAMPLE, environ={})
    assert config.loss.name == "kd" and config.teacher.endpoints == ["grpc://127.0.0.1:50051"]
    assert config.device == "auto" and config.amp == "auto"


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"loss": {"name": "dkd"}, "epochs": 3, "teacher": {"endpoints": ["a"]}})
    config = load_run_config(
        path, {"epochs": 7, "teacher.endpoints": ["grpc://b:1"], "seed": None}, environ={}
    )
    assert (config.loss.name, config.epochs, config.teacher.endpoints) == ("dkd", 7, ["grpc://b:1"])
    assert config.seed == 0


def test_the_token_comes_from_the_environment_unless_set(tmp_path: Path) -> None:
    env = {"KDSERVE_AUTH_TOKEN": "from-env"}
    config = load_run_config(None, {"loss.name": "ce"}, environ=env)
    assert config.teacher.token is not None
    assert config.teacher.token.get_secret_value() == "from-env"
    path = write(tmp_path, {"loss": {"name": "ce"}, "teacher": {"token": "from-file"}})
    token = load_run_config(path, environ=env).teacher.token
    assert token is not None and token.get_secret_value() == "from-file"
    assert "from-env" not in repr(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss.name": "fitnets"}, "unknown loss 'fitnets'; known losses: ce, deit, dist, dkd, kd"),
        (
            {"loss.name": "ce", "loss.hyperparameters": {"temperature": 4.0}},
            "loss 'ce': temperature: Extra inputs are not permitted",
        ),
        (
            {"loss.name": "kd", "loss.hyperparameters": {"temperature": 0}},
            "loss 'kd': temperature: Input should be greater than 0",
        ),
        ({"loss.name": "ce", "batch_size": 0}, "batch_size"),
        ({"loss.name": "ce", "device": "gpu0"}, "device"),
        ({"loss.name": "ce", "amp": "half"}, "amp"),
        ({"loss.name": "ce", "data.labeled_fraction": 1.5}, "data.labeled_fraction"),
        ({"loss.name": "ce", "optimizer.name": "lamb"}, "optimizer.name"),
        ({"loss.name": "ce", "epoch": 3}, "epoch"),
        ({"loss.name": "kd"}, "needs a teacher"),
    ],
)
def test_bad_values_name_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides, environ={})


def test_a_bad_file_names_itself(tmp_path: Path) -> None:
    path = write(tmp_path, {"optimizer": {"lr": -1}, "loss": {"name": "ce"}})
    with pytest.raises(
        ConfigError,
        match=r"(?s)student\.yaml.*optimizer\.lr: Input should be greater than 0 \(got -1\)",
    ):
        load_run_config(path, environ={})
