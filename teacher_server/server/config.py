"""Teacher server configuration: pydantic models loaded from YAML, then env, then CLI flags."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from teacher_server.shared.endpoints import SECURE_TARGET, TARGET_SCHEMES, parse_endpoint
from teacher_server.shared.settings import (
    AUTH_TOKEN_ENV,
    ConfigError,
    format_validation_error,
    read_yaml_mapping,
)
from teacher_server.shared.views import IMAGENET_MEAN, IMAGENET_STD

ENV_PREFIX = "KDSERVE_SERVER__"
REMOTE_TOKEN_ENV = "KDSERVE_REMOTE_TOKEN"
"""The token this server presents to the teacher servers of its remote ensemble members."""
NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"
REMOTE_SCHEMES = ("grpc", "grpcs", "http", "https")

ModelDtype = Literal["float32", "float16", "bfloat16"]
MAX_PASS_SIZES = 8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    """Where the server listens and how it batches."""

    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)
    device: str | list[str] = "cpu"
    replicas_per_device: int = Field(1, ge=1, le=256)
    threads_per_replica: int | Literal["auto"] = "auto"
    max_batch_size: int = Field(256, ge=1)
    max_delay_ms: float = Field(2.0, ge=0)
    max_queue_images: int = Field(4096, ge=1)
    share_forwards: bool = True
    """Requests of the same view and mix in flight on one model share one forward (`sharing`)."""
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_request_images: int = Field(1024, ge=1)
    max_request_pixels: int = Field(1024 * 224 * 224, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    grpc_max_connection_age_s: float = Field(60.0, ge=0)
    """A gRPC connection older than this is sent GOAWAY and closes when its requests finish,
    so clients resolve a `dns:///` name again and find replicas added since (0: never)."""
    shutdown_grace_s: float = Field(10.0, ge=0)
    heap_trim_mib: int = Field(32, ge=0)
    auth_token: SecretStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @model_validator(mode="after")
    def _tls_files(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ValueError(f"TLS needs both tls_cert and tls_key; {missing} is not set")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} does not exist")
        return self

    @property
    def tls(self) -> bool:
        """Whether both ports speak TLS (https://, grpcs://)."""
        return self.tls_cert is not None

    @field_validator("device")
    @classmethod
    def _check_devices(cls, value: str | list[str]) -> str | list[str]:
        for device in [value] if isinstance(value, str) else value:
            if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
                raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
        if isinstance(value, list) and not value:
            raise ValueError("device list is empty")
        return value

    @field_validator("threads_per_replica")
    @classmethod
    def _positive_or_auto(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError(f"must be 'auto' or an int in [1, 256], got {value}")
        return value

    @property
    def devices(self) -> list[str]:
        return [self.device] if isinstance(self.device, str) else list(self.device)

    def cpu_threads(self) -> int | None:
        """Intra-op threads per replica; auto shares the cores among the CPU replicas.

        None where no replica runs on the CPU (torch's default is kept).
        """
        if self.threads_per_replica != "auto":
            return self.threads_per_replica
        cpu_replicas = self.replicas_per_device * self.devices.count("cpu")
        return max(1, usable_cores() // cpu_replicas) if cpu_replicas else None


def usable_cores() -> int:
    """Cores this process may run on (container limits included where the OS reports them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ModelConfig(_Strict):
    """One served network: its architecture by registry name, weights and input contract."""

    name: str = Field(min_length=1, pattern=NAME_PATTERN)
    arch: str = Field(min_length=1)
    weights: Path | None = None
    random_init: bool = False
    num_classes: int = Field(ge=1)
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: ModelDtype = "float32"
    channels_last: bool = False
    compile: bool = False
    pass_sizes: tuple[int, ...] = ()
    """Pad every pass to the smallest of these sizes that holds it: a few fixed shapes for
    `compile` and `cuda_graphs`, and a bounded primitive cache for oneDNN on a CPU. Empty: each
    pass runs at its own size."""
    cuda_graphs: bool = False
    """Capture one CUDA graph per pass size at start-up and replay it for every pass."""
    pinned_upload: bool = True
    """On a GPU, stage each request's pixels in pinned memory so the upload is asynchronous."""

    @field_validator("input_size", mode="before")
    @classmethod
    def _square_size(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"input_size must be positive, got {list(value)}")
        return value

    @field_validator("pass_sizes")
    @classmethod
    def _few_positive_sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(size < 1 for size in value):
            raise ValueError(f"pass sizes must be positive, got {list(value)}")
        sizes = tuple(sorted(set(value)))
        if len(sizes) > MAX_PASS_SIZES:
            raise ValueError(
                f"at most {MAX_PASS_SIZES} pass sizes (torch.compile keeps {MAX_PASS_SIZES} "
                f"shapes before it stops compiling), got {len(sizes)}"
            )
        return sizes

    @model_validator(mode="after")
    def _graphs_need_sizes(self) -> ModelConfig:
        if self.cuda_graphs and not self.pass_sizes:
            raise ValueError(
                f"model {self.name!r}: cuda_graphs needs pass_sizes (one graph is captured per "
                "size), e.g. pass_sizes: [32, 64, 128, 256]"
            )
        if self.cuda_graphs and self.compile:
            raise ValueError(
                f"model {self.name!r}: choose compile or cuda_graphs, not both (this server "
                "captures graphs of the eager module)"
            )
        return self

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError(f"std must be > 0 per channel, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _weights_or_random(self) -> ModelConfig:
        carries_weights = self.arch.startswith("file:")
        if self.weights is None and not self.random_init and not carries_weights:
            raise ValueError(
                f"model {self.name!r} has no weights; set `weights: path` "
                "(or `random_init: true`, for tests and benchmarks only)"
            )
        if carries_weights and self.random_init:
            raise ValueError(
                f"model {self.name!r} is a file archive with its own weights; drop random_init"
            )
        if self.weights is not None and self.random_init:
            raise ValueError(f"model {self.name!r} sets both weights and random_init: true")
        return self


@dataclass(frozen=True)
class RemoteMember:
    """An ensemble member served by another teacher server: `grpc://host:port/model`, or by
    the replicas of a gRPC target: `dns:///host:port/model`."""

    url: str
    """The member's name in the config, in errors and in /metrics."""
    endpoint: str
    """`scheme://host:port` or the gRPC target: what the client connects to."""
    model: str
    """The model's name on that server."""


def remote_member(member: str) -> RemoteMember | None:
    """The remote member a member string names (`scheme://host:port/model`, or a gRPC target
    of replicas and its model: `dns:///host:port/model`), None for a local model's name;
    ValueError for a string that does not name one model on one server or target."""
    scheme, colon, _ = member.removeprefix(SECURE_TARGET).partition(":")
    if colon and scheme in TARGET_SCHEMES:
        return _balanced_member(member)
    if "://" not in member:
        return None
    try:
        parts = urlsplit(member)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"remote member {member!r}: {exc}") from None
    model = parts.path.removeprefix("/")
    if parts.scheme not in REMOTE_SCHEMES:
        raise ValueError(
            f"remote member {member!r} must start with one of "
            f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}"
        )
    if not parts.hostname or port is None:
        raise ValueError(
            f"remote member {member!r} needs a host and a port: scheme://host:port/model"
        )
    if parts.username is not None or parts.query or parts.fragment:
        raise ValueError(
            f"remote member {member!r}: no user, query or fragment (the token is remote.token)"
        )
    if not re.fullmatch(NAME_PATTERN, model):
        raise ValueError(f"remote member {member!r} must end with /model, one model's name")
    return RemoteMember(member, f"{parts.scheme}://{parts.netloc}", model)


def _balanced_member(member: str) -> RemoteMember:
    """A member behind a gRPC target (round robin over its replicas): `target/model`."""
    target, _, model = member.rpartition("/")
    if not re.fullmatch(NAME_PATTERN, model):
        raise ValueError(
            f"remote member {member!r} must end with /model, one model's name "
            "(a gRPC target's member is e.g. dns:///host:port/model)"
        )
    try:
        endpoint = parse_endpoint(target)
    except ValueError as exc:
        raise ValueError(f"remote member {member!r}: {exc}") from None
    if endpoint.secure and len(endpoint.hosts) > 1:
        raise ValueError(
            f"remote member {member!r}: TLS to a list of addresses needs the name in their "
            "certificate, which a remote member cannot give; name them grpcs+dns:///name:port"
        )
    return RemoteMember(member, target, model)


class RemoteConfig(_Strict):
    """How this server reaches the teacher servers of its remote ensemble members."""

    token: SecretStr | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_insecure_token: bool = False
    timeout_s: float | None = Field(None, gt=0)
    """A member that has not answered in this long is down (None: the request's deadline)."""
    max_in_flight: int = Field(64, ge=1)
    """Requests on one remote member at once; more are refused 429 (backpressure)."""
    connect_timeout_s: float = Field(120.0, gt=0)
    """At start-up, how long to wait for each remote member to say what it serves."""

    @model_validator(mode="after")
    def _tls_files(self) -> RemoteConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("remote.tls_cert and remote.tls_key go together")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"remote.{name} {str(path)!r} does not exist")
        return self


class EnsembleConfig(_Strict):
    """Several served models answering as one; combined at temperature 1, then tempered."""

    name: str = Field(min_length=1, pattern=NAME_PATTERN)
    members: list[str] = Field(min_length=1)
    """Local models' names, or remote members: `grpc://host:port/model` (grpcs, http, https),
    or a gRPC target of a member's replicas and the model: `dns:///host:port/model`."""
    weights: list[float] | None = None
    combine: Literal["mean_logits", "mean_probs"] = "mean_logits"
    quorum: int | None = Field(None, ge=1)
    """Members that must answer (None: all); the answer names the members it used."""

    @field_validator("members")
    @classmethod
    def _members_parse(cls, members: list[str]) -> list[str]:
        for member in members:
            remote_member(member)
        repeated = sorted({m for m in members if members.count(m) > 1})
        if repeated:
            raise ValueError(f"members are listed more than once: {repeated}; use weights")
        return members

    @model_validator(mode="after")
    def _weights_match(self) -> EnsembleConfig:
        if self.quorum is not None and self.quorum > len(self.members):
            raise ValueError(
                f"ensemble {self.name!r} has quorum {self.quorum} but {len(self.members)} members"
            )
        if self.weights is not None:
            if len(self.weights) != len(self.members):
                raise ValueError(
                    f"ensemble {self.name!r} has {len(self.members)} members but "
                    f"{len(self.weights)} weights"
                )
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(
                    f"ensemble {self.name!r} weights must be >= 0 with a positive sum, "
                    f"got {self.weights}"
                )
        return self

    @property
    def member_weights(self) -> list[float]:
        return self.weights if self.weights is not None else [1.0] * len(self.members)

    @property
    def local_members(self) -> list[str]:
        return [m for m in self.members if remote_member(m) is None]

    @property
    def remote_members(self) -> list[RemoteMember]:
        return [r for r in map(remote_member, self.members) if r is not None]

    @property
    def needed(self) -> int:
        """How many members must answer."""
        return self.quorum if self.quorum is not None else len(self.members)


class TeacherConfig(_Strict):
    """The whole teacher server configuration file."""

    server: ServerConfig = ServerConfig()
    models: list[ModelConfig] = []
    ensembles: list[EnsembleConfig] = []
    remote: RemoteConfig = RemoteConfig()

    @model_validator(mode="after")
    def _names_resolve(self) -> TeacherConfig:
        if not self.models and not any(e.remote_members for e in self.ensembles):
            raise ValueError("nothing to serve: list models, or an ensemble of remote members")
        models = {m.name: m for m in self.models}
        names = [m.name for m in self.models] + [e.name for e in self.ensembles]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"names must be unique across models and ensembles: {duplicates}")
        compiled = [m.name for m in self.models if m.compile]
        if compiled and self.server.replicas_per_device > 1:
            raise ValueError(
                f"compile: true needs replicas_per_device: 1 (torch.compile is not thread-safe "
                f"while compiling); compiled models: {compiled}"
            )
        for model in self.models:
            self._check_passes(model)
            self.request_pixels(model.name)
        for ensemble in self.ensembles:
            unknown = [m for m in ensemble.local_members if m not in models]
            if unknown:
                raise ValueError(
                    f"ensemble {ensemble.name!r} names unknown members {unknown}; "
                    f"models are {sorted(models)} (a remote member is scheme://host:port/model or dns:///host:port/model)"
                )
            classes = {models[m].num_classes for m in ensemble.local_members}
            if len(classes) > 1:
                raise ValueError(
                    f"ensemble {ensemble.name!r} members disagree on num_classes: {sorted(classes)}"
                )
            self.request_pixels(ensemble.name)
        return self

    def _check_passes(self, model: ModelConfig) -> None:
        largest = self.server.max_batch_size
        if model.pass_sizes and model.pass_sizes[-1] < largest:
            raise ValueError(
                f"model {model.name!r}: the largest of pass_sizes {list(model.pass_sizes)} "
                f"must hold the server's largest pass (server.max_batch_size: {largest})"
            )
        not_gpu = [device for device in self.server.devices if not device.startswith("cuda")]
        if model.cuda_graphs and not_gpu:
            raise ValueError(
                f"model {model.name!r}: cuda_graphs needs CUDA devices; server.device has {not_gpu}"
            )

    def request_pixels(self, name: str) -> int:
        """Pixels one image sent to `name` costs here: its input size, summed over an ensemble's
        local members (every member computes every image; remote members compute on their own
        servers, under their own limits). ValueError if one image is over max_request_pixels."""
        models = {m.name: m for m in self.models}
        members = next((e.local_members for e in self.ensembles if e.name == name), [name])
        pixels = sum(models[m].input_size[0] * models[m].input_size[1] for m in members)
        if pixels > self.server.max_request_pixels:
            raise ValueError(
                f"one image for {name!r} costs {pixels} pixels at its input size, over "
                f"max_request_pixels ({self.server.max_request_pixels})"
            )
        return pixels

    def max_images(self, name: str) -> int:
        """Images one request to `name` may carry: max_request_images, max_queue_images (a
        larger request could never be queued), and max_request_pixels divided by one image's
        pixels at the model's input size (an ensemble of remote members only costs no pixels
        here)."""
        pixels = self.request_pixels(name)
        return min(
            self.server.max_request_images,
            self.server.max_queue_images,
            self.server.max_request_pixels // pixels if pixels else self.server.max_request_images,
        )


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """KDSERVE_SERVER__MAX_BATCH_SIZE=64 -> {"max_batch_size": "64"}; plus KDSERVE_AUTH_TOKEN."""
    overrides: dict[str, Any] = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX)
    }
    if environ.get(AUTH_TOKEN_ENV):
        overrides.setdefault("auth_token", environ[AUTH_TOKEN_ENV])
    if "device" in overrides:
        overrides["device"] = parse_devices(overrides["device"])
    return overrides


def parse_devices(value: str) -> str | list[str]:
    """`cuda:0,cuda:1` -> a list of devices; a single name stays a string."""
    return value.split(",") if "," in value else value


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Weights paths in a file are relative to that file; `file:` archs too."""
    for model in raw.get("models") or []:
        if not isinstance(model, dict):
            continue
        weights = model.get("weights")
        if isinstance(weights, str) and not Path(weights).is_absolute():
            model["weights"] = str(base / weights)
        arch = model.get("arch")
        if isinstance(arch, str) and arch.startswith("file:") and not Path(arch[5:]).is_absolute():
            model["arch"] = "file:" + str(base / arch[5:])


def load_config(
    path: Path | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    server_overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TeacherConfig:
    """Read YAML (or `data`), apply KDSERVE_SERVER__* env vars (and KDSERVE_REMOTE_TOKEN), then
    CLI overrides, and validate.

    Precedence: CLI flags > environment > file > defaults.
    """
    source = str(path) if path is not None else "<dict>"
    if path is not None:
        raw = read_yaml_mapping(path)
        _resolve_paths(raw, Path(path).resolve().parent)
    else:
        raw = dict(data or {})
    environ = os.environ if environ is None else environ
    server = dict(raw.get("server") or {})
    server.update(_env_overrides(environ))
    server.update({k: v for k, v in (server_overrides or {}).items() if v is not None})
    raw["server"] = server
    if environ.get(REMOTE_TOKEN_ENV) and isinstance(raw.get("remote") or {}, dict):
        raw["remote"] = {**(raw.get("remote") or {}), "token": environ[REMOTE_TOKEN_ENV]}
    try:
        return TeacherConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
