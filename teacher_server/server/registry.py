"""The served models and ensembles: built from the config, weights loaded, warmed up, batched."""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from teacher_server.server.batcher import Batcher
from teacher_server.server.config import EnsembleConfig, ModelConfig, TeacherConfig
from teacher_server.server.engine import InputSpec, ModelRunner
from teacher_server.server.stats import ModelStats
from teacher_server.shared.archs import create_model
from teacher_server.shared.contract import ModelInfo
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
    def stats(self) -> ModelStats:
        return self.batcher.stats


@dataclass
class ServedEnsemble:
    """Several served models as one; their forward passes are shared with direct users."""

    config: EnsembleConfig
    members: list[ServedModel]
    stats: ModelStats

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def member_weights(self) -> list[float]:
        return self.config.member_weights


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

    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        self._models: dict[str, ServedModel] = {}
        self._ensembles: dict[str, ServedEnsemble] = {}
        self._names = [m.name for m in config.models] + [e.name for e in config.ensembles]
        self._ready = threading.Event()
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._closed

    def load(self) -> None:
        """Build, load and warm up every model on every device, then start serving them."""
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
            self._ensembles[ensemble.name] = ServedEnsemble(
                ensemble, [self._models[m] for m in ensemble.members], ModelStats(ensemble.name)
            )
        self._ready.set()

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
                on_device = torch.compile(on_device, dynamic=True)  # type: ignore[assignment]
            replicas = [
                ModelRunner(on_device, spec, device) for _ in range(server.replicas_per_device)
            ]
            self._warm_up(config, replicas[0])
            runners += replicas
        return runners

    def _warm_up(self, config: ModelConfig, runner: ModelRunner) -> None:
        """Run the real path once per batch shape; checks the model's number of classes."""
        sizes = {1, min(2, self.config.server.max_batch_size)}
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
        """What `GET /v1/models` and ListModels show; known before the models finish loading."""
        models = {m.name: m for m in self.config.models}
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
            described.append(
                ModelInfo(
                    name=e.name,
                    kind="ensemble",
                    num_classes=models[e.members[0]].num_classes,
                    input_size=max((models[m].input_size for m in e.members), key=_area),
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

    def drain(self) -> None:
        """Refuse new requests (503 / UNAVAILABLE); those already queued still run."""
        self._closed = True

    def close(self) -> None:
        """Refuse new requests and stop the batchers (what is still queued gets 503)."""
        self._closed = True
        for model in self._models.values():
            model.batcher.close()
