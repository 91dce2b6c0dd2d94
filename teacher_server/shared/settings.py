"""What both sides' configurations share: YAML files, readable errors, the token's variable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

AUTH_TOKEN_ENV = "KDSERVE_AUTH_TOKEN"
"""The bearer token's environment variable, read by the teacher server and by students alike."""


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file, the field and the value."""


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per bad field: where, what is wrong, and the value given."""
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, Mapping) else f" (got {value!r})"
        lines.append(f"  {where}: {item['msg']}{shown}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict | None):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
    return dict(loaded or {})
