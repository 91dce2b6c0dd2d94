"""A sweep file: a grid (or a list) of overrides of one student config, every run resolved
and validated before any starts."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from student_worker.config import RunConfig, available_cores, load_run_config
from student_worker.models import check_student
from teacher_server.shared.settings import ConfigError, format_validation_error, read_yaml_mapping

UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
"""What a run name may not hold: anything a directory name or a shell would trip on."""
MAX_NAME = 120
NOT_SWEPT = {
    "output_dir": "each run goes to the sweep's output_dir/<run name>",
    "teacher.token": "a secret would be in the run's name: set it in the base config or "
    "KDSERVE_AUTH_TOKEN",
}
"""Keys no run overrides, and why."""


class SweepFile(BaseModel):
    """What a sweep file holds: `base` is relative to the file, `output_dir` to the cwd."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: Path | None = None
    teacher: str | None = None
    output_dir: Path = Path("runs/sweep")
    parallel: int = Field(1, ge=1)
    grid: dict[str, list[Any]] = {}
    runs: list[dict[str, Any]] = []

    @field_validator("grid")
    @classmethod
    def _values_listed(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} lists no values")
        return grid

    @field_validator("grid", "runs")
    @classmethod
    def _no_unswept_keys(cls, value: Any) -> Any:
        override_sets = [value] if isinstance(value, dict) else value
        for overrides in override_sets:
            for key, why in NOT_SWEPT.items():
                if key in overrides:
                    raise ValueError(f"{key} cannot be swept: {why}")
        return value

    def override_sets(self) -> list[dict[str, Any]]:
        """The grid's cartesian product (the last key varying fastest), then the listed runs."""
        keys = list(self.grid)
        product = itertools.product(*self.grid.values()) if keys else iter(())
        return [dict(zip(keys, values, strict=True)) for values in product] + [
            dict(run) for run in self.runs
        ]


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: its name, the values it sets, and its resolved config."""

    name: str
    overrides: dict[str, Any]
    config: RunConfig

    @property
    def directory(self) -> Path:
        return self.config.output_dir


@dataclass(frozen=True)
class Sweep:
    """The validated plan: every run, where they go and how many run at a time."""

    source: Path
    output_dir: Path
    parallel: int
    runs: list[PlannedRun]

    @property
    def swept_keys(self) -> list[str]:
        """Every key some run overrides, in the order they first appear."""
        return list(dict.fromkeys(key for run in self.runs for key in run.overrides))

    def threads(self, run: PlannedRun) -> int:
        """The run's torch threads: as it sets them, else its share of this machine's cores."""
        if run.config.threads is not None:
            return run.config.threads
        return max(1, available_cores() // self.parallel)


def format_override(value: Any) -> str:
    """A swept value as names, tables and the CSV show it: strings bare, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def run_name(overrides: Mapping[str, Any]) -> str:
    """`key=value,...` of the run's overrides, safe as a directory name (`base` for none);
    a long one is cut and ends in a hash of the whole, so names stay unique and stable."""
    if not overrides:
        return "base"
    text = ",".join(f"{key}={format_override(value)}" for key, value in overrides.items())
    name = UNSAFE.sub("_", text)
    if len(name) <= MAX_NAME:
        return name
    return f"{name[: MAX_NAME - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def config_value(config: RunConfig, dotted: str) -> Any:
    """The resolved value at a dotted key such as `optimizer.lr` (None where there is none)."""
    node: Any = config.model_dump(mode="json")
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def config_text(run: PlannedRun) -> str:
    """The run's resolved config as YAML for `kdserve-student --config` (the teacher's token
    is left out: runs get it from KDSERVE_AUTH_TOKEN)."""
    data = run.config.model_dump(mode="json", exclude={"teacher": {"token"}})
    header = f"# kdserve-sweep run {run.name}: the sweep's base config and its overrides\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def load_sweep(
    path: Path,
    *,
    parallel: int | None = None,
    teacher: str | None = None,
    output_dir: Path | None = None,
) -> Sweep:
    """Read and validate a sweep file (the flags over its values) and resolve every run's
    config; raises ConfigError naming the file, the run and the field."""
    raw = read_yaml_mapping(path)
    flags = {"parallel": parallel, "teacher": teacher, "output_dir": output_dir}
    given = {key: value for key, value in flags.items() if value is not None}
    raw.update(given)
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as exc:
        shown = "".join(f" --{key.replace('_', '-')} {value}" for key, value in given.items())
        source = f"{path} with{shown}" if given else str(path)
        raise ConfigError(format_validation_error(exc, source)) from None
    override_sets = sweep.override_sets()
    if not override_sets:
        raise ConfigError(f"sweep {path} has no runs: give a grid, a list of runs, or both")
    base = (
        sweep.base if sweep.base is None or sweep.base.is_absolute() else path.parent / sweep.base
    )
    runs: list[PlannedRun] = []
    for overrides in override_sets:
        name = run_name(overrides)
        clash = next((run for run in runs if run.name == name), None)
        if clash is not None:
            raise ConfigError(
                f"sweep {path}: runs {clash.overrides} and {overrides} are both named {name!r}"
            )
        resolved = {**overrides, "output_dir": str(sweep.output_dir / name)}
        if sweep.teacher is not None:
            resolved["teacher.endpoints"] = [sweep.teacher]
        try:
            config = load_run_config(base, resolved)
            check_student(config.student, config.data.image_size)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"sweep {path}, run {name}: {exc}") from None
        runs.append(PlannedRun(name, overrides, config))
    return Sweep(path, sweep.output_dir, sweep.parallel, runs)
