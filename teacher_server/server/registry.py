"""The served models and ensembles: built from the config, weights loaded, warmed up, batched.

An ensemble's members are local models (their batchers are shared with direct users) or
models on other teacher servers (`RemoteModel`, made by the `connect` the server passes in:
the registry itself imports no transport library).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from teacher_server.server.batcher import Batcher
from teacher_server.server.config import (
    EnsembleConfig,
    ModelConfig,
    RemoteConfig,
    RemoteMember,
    TeacherConfig,
)
from teacher_server.server.engine import InputSpec, ModelRunner
from teacher_server.server.stats import ModelStats
from teacher_server.shared.archs import create_model
from teacher_server.shared.contract import Mix, ModelInfo
from teacher_server.shared.errors import ModelNotFound, NotReady
from teacher_server.shared.weights import load_weights

log = logging.getLogger(__name__)
RANDOM_INIT_SEED = 0


class ModelLoadError(RuntimeError):
    """A model could not be built, loaded or warmed up; the server does not start."""


@dataclass
class ServedModel:
    """One model with its replicas behind one batcher."""

    config: ModelConfig
    batcher: Batcher

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def members(self) -> list[ServedModel]:
        return [self]

    @property
    def member_weights(self) -> list[float]:
        return [1.0]

    @property
    def needed(self) -> int:
        return 1

    @property
    def stats(self) -> ModelStats:
        return self.batcher.stats


@dataclass(frozen=True)
class MemberAnswer:
    """A remote member's raw logits (temperature 1) for one request, and where its time went."""

    logits: torch.Tensor
    started_at: float
    """When its first forward began, on this server's monotonic clock (estimated)."""
    compute_s: float
    batch_sizes: tuple[int, ...]


class RemoteModel(Protocol):
    """A model on another teacher server, as the registry and the lifecycle use it."""

    name: str
    """The member as the config names it: `grpc://host:port/model`."""

    def describe(self, wait_s: float) -> ModelInfo:
        """What that server says about the model; waits up to `wait_s` for it to answer."""
        ...

    def submit(
        self, images: torch.Tensor, mix: Mix | None, deadline: float, client_id: str
    ) -> Future[MemberAnswer]:
        """Ask for a request's raw logits by `deadline` (monotonic), as sent by `client_id`
        (the member's batches take the students in turn, not this server as one client);
        raise QueueFull when too many requests are in flight already. The future's error is
        a TeacherError naming the member."""
        ...

    def close(self) -> None: ...


ConnectRemote = Callable[[RemoteMember, RemoteConfig], RemoteModel]
Member = ServedModel | RemoteModel


@dataclass
class ServedEnsemble:
    """Several models as one; local members' forward passes are shared with direct users."""

    config: EnsembleConfig
    members: list[Member]
    stats: ModelStats

    @property
    def name(self) -> str:
        return self.config.name

    num_classes: int

    @property
    def member_weights(self) -> list[float]:
        return self.config.member_weights

    @property
    def needed(self) -> int:
        """Members that must answer (all, unless the config gives a quorum)."""
        return self.config.needed


Served = ServedModel | ServedEnsemble


def build_module(config: ModelConfig) -> torch.nn.Module:
    """The model's architecture with its weights (random ones, seeded, only if asked for)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        module = create_model(config.arch, config.num_classes, config.input_size)
    if config.weights is not None:
        load_weights(module, Path(config.weights))
    return module


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


class Registry:
    """Every name the server answers to; models load in the background, names are known at once."""

    def __init__(self, config: TeacherConfig, connect: ConnectRemote | None = None) -> None:
        self.config = config
        self._connect = connect
        self._models: dict[str, ServedModel] = {}
        self._remotes: dict[str, RemoteModel] = {}
        self._remote_info: dict[str, ModelInfo] = {}
        self._ensembles: dict[str, ServedEnsemble] = {}
        self._names = [m.name for m in config.models] + [e.name for e in config.ensembles]
        self._ready = threading.Event()
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._closed

    def load(self) -> None:
        """Ask each remote member what it serves; build, load and warm up every local model
        on every device; then start serving them."""
        self._connect_remotes()
        server = self.config.server
        threads = server.cpu_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        for model_config in self.config.models:
            started = time.monotonic()
            runners = self._build_replicas(model_config)
            self._models[model_config.name] = ServedModel(
                model_config,
                Batcher(
                    model_config.name,
                    runners,
                    max_batch_size=server.max_batch_size,
                    max_delay_ms=server.max_delay_ms,
                    max_queue_images=server.max_queue_images,
                ),
            )
            log.info(
                "model %r ready: %s, %d replica(s) on %s, %.1fs",
                model_config.name,
                model_config.arch,
                len(runners),
                ",".join(server.devices),
                time.monotonic() - started,
            )
        for ensemble in self.config.ensembles:
            members: list[Member] = [
                self._models.get(m) or self._remotes[m] for m in ensemble.members
            ]
            self._ensembles[ensemble.name] = ServedEnsemble(
                ensemble,
                members,
                ModelStats(ensemble.name, members=ensemble.members),
                self._member_infos(ensemble)[0].num_classes,
            )
        self._ready.set()

    def _connect_remotes(self) -> None:
        """Connect to every remote member and learn its classes and input size; the members
        of each ensemble must agree on the number of classes."""
        settings = self.config.remote
        for ensemble in self.config.ensembles:
            for member in ensemble.remote_members:
                if member.url in self._remotes:
                    continue
                if self._connect is None:
                    raise ModelLoadError(f"{member.url}: this registry cannot reach remote members")
                started = time.monotonic()
                try:
                    remote = self._connect(member, settings)
                except ValueError as exc:
                    raise ModelLoadError(f"ensemble member {member.url}: {exc}") from exc
                self._remotes[member.url] = remote
                try:
                    info = remote.describe(settings.connect_timeout_s)
                except Exception as exc:
                    raise ModelLoadError(
                        f"ensemble {ensemble.name!r}: member {member.url} did not say what it "
                        f"serves within {settings.connect_timeout_s:g}s "
                        f"(remote.connect_timeout_s): {exc}"
                    ) from exc
                self._remote_info[member.url] = info
                log.info(
                    "remote member %s: %d classes at %dx%d, %.1fs",
                    member.url,
                    info.num_classes,
                    *info.input_size,
                    time.monotonic() - started,
                )
        for ensemble in self.config.ensembles:
            classes = {info.num_classes for info in self._member_infos(ensemble)}
            if len(classes) > 1:
                raise ModelLoadError(
                    f"ensemble {ensemble.name!r} members disagree on num_classes: {sorted(classes)}"
                )

    def _build_replicas(self, config: ModelConfig) -> list[ModelRunner]:
        try:
            module = build_module(config)
        except Exception as exc:
            raise ModelLoadError(f"model {config.name!r} ({config.arch}): {exc}") from exc
        spec = InputSpec(
            config.input_size, config.mean, config.std, config.dtype, config.channels_last
        )
        server = self.config.server
        runners: list[ModelRunner] = []
        for index, device in enumerate(server.devices):
            # Replicas on one device share the module: inference in eval mode mutates nothing.
            on_device = module if index == 0 else copy.deepcopy(module)
            if config.compile:
                # Fixed pass sizes: one static graph per size, compiled here in the warm-up.
                dynamic = not config.pass_sizes
                on_device = torch.compile(on_device, dynamic=dynamic)  # type: ignore[assignment]
            replicas = [
                ModelRunner(
                    on_device,
                    spec,
                    device,
                    pass_sizes=config.pass_sizes,
                    pinned_upload=config.pinned_upload,
                )
                for _ in range(server.replicas_per_device)
            ]
            self._warm_up(config, replicas[0])
            if config.cuda_graphs:
                for replica in replicas:
                    self._capture(config, replica)
            runners += replicas
        return runners

    def _warm_up(self, config: ModelConfig, runner: ModelRunner) -> None:
        """Run the real path once per batch shape; checks the model's number of classes."""
        sizes = {1, min(2, self.config.server.max_batch_size), *config.pass_sizes}
        if runner.device.type == "cuda":
            sizes.add(self.config.server.max_batch_size)
        for size in sorted(sizes):
            images = torch.zeros((size, 3, *config.input_size), dtype=torch.uint8)
            try:
                batch = runner.new_batch(size)
                runner.prepare(images, 0, size, None, batch)
                logits = runner.forward(batch)
            except Exception as exc:
                raise ModelLoadError(
                    f"model {config.name!r} failed its warm-up forward: {exc}"
                ) from exc
            if tuple(logits.shape) != (size, config.num_classes):
                raise ModelLoadError(
                    f"model {config.name!r} returns logits of shape {list(logits.shape)} for "
                    f"{size} images, but num_classes is {config.num_classes}"
                )

    def _capture(self, config: ModelConfig, runner: ModelRunner) -> None:
        started = time.monotonic()
        try:
            runner.capture_graphs()
        except Exception as exc:
            raise ModelLoadError(
                f"model {config.name!r}: capturing its CUDA graphs failed (set cuda_graphs: "
                f"false to serve it eagerly): {type(exc).__name__}: {exc}"
            ) from exc
        log.info(
            "model %s: CUDA graphs for passes of %s on %s, %.1fs",
            config.name,
            list(config.pass_sizes),
            runner.device,
            time.monotonic() - started,
        )

    def get(self, name: str) -> Served:
        """The model or ensemble by name: 404 for a name not served here, 503 while loading."""
        if name not in self._names:
            raise ModelNotFound(f"model {name!r} is not served here; served: {self._names}")
        if not self.ready:
            raise NotReady(
                "models are still loading" if not self._closed else "server is shutting down"
            )
        return self._models.get(name) or self._ensembles[name]

    def record_invalid(self, name: str | None) -> None:
        """Count a request that failed validation against the model it named, if served."""
        served = self._models.get(name or "") or self._ensembles.get(name or "")
        if served is not None:
            served.stats.record_outcome("invalid")

    def all_stats(self) -> list[ModelStats]:
        return [m.stats for m in self._models.values()] + [
            e.stats for e in self._ensembles.values()
        ]

    def describe(self) -> tuple[ModelInfo, ...]:
        """What `GET /v1/models` and ListModels show; known before the local models finish
        loading, once the remote members have said what they serve (NotReady until then)."""
        described = [
            ModelInfo(
                name=m.name,
                kind="model",
                num_classes=m.num_classes,
                input_size=m.input_size,
                mean=m.mean,
                std=m.std,
                dtype=m.dtype,
                max_images=self.config.max_images(m.name),
            )
            for m in self.config.models
        ]
        for e in self.config.ensembles:
            members = self._member_infos(e)
            described.append(
                ModelInfo(
                    name=e.name,
                    kind="ensemble",
                    num_classes=members[0].num_classes,
                    input_size=max((m.input_size for m in members), key=_area),
                    mean=(),
                    std=(),
                    dtype="",
                    members=tuple(e.members),
                    combine=e.combine,
                    member_weights=tuple(e.member_weights),
                    max_images=self.config.max_images(e.name),
                )
            )
        return tuple(described)

    def _member_infos(self, ensemble: EnsembleConfig) -> list[ModelInfo | ModelConfig]:
        """What each member says of its classes and input size; NotReady while a remote member
        has not said it yet."""
        models = {m.name: m for m in self.config.models}
        infos: list[ModelInfo | ModelConfig] = []
        for member in ensemble.members:
            info = models.get(member) or self._remote_info.get(member)
            if info is None:
                raise NotReady(
                    f"ensemble {ensemble.name!r} waits for its remote member {member} to say "
                    "what it serves"
                )
            infos.append(info)
        return infos

    def drain(self) -> None:
        """Refuse new requests (503 / UNAVAILABLE); those already queued still run."""
        self._closed = True

    def close(self) -> None:
        """Refuse new requests and stop the batchers (what is still queued gets 503)."""
        self._closed = True
        for model in self._models.values():
            model.batcher.close()
        for remote in self._remotes.values():
            remote.close()
