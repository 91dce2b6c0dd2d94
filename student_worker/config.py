"""Student run configuration: pydantic models loaded from YAML, overridden by CLI flags.

Every loss hyper-parameter or objective weight left unset takes the loss's recipe for the
image scale (`student_worker.losses`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from student_worker import losses
from student_worker.augment import AugmentSettings
from student_worker.data import IMAGEFOLDER_CROP_PCT, DatasetName
from student_worker.objective import Objective, ObjectiveWeights
from teacher_server.client.tls import ClientTls, check_endpoint
from teacher_server.shared.settings import (
    AUTH_TOKEN_ENV,
    ConfigError,
    format_validation_error,
    read_yaml_mapping,
)
from teacher_server.shared.views import IMAGENET_MEAN, IMAGENET_STD

FIXED_CACHE = "fixed_teacher.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    name: DatasetName = "digits"
    root: Path | None = None
    eval_root: Path | None = None
    image_size: int | None = Field(None, ge=8)
    labeled_fraction: float = Field(1.0, ge=0.0, le=1.0)
    unlabeled_root: Path | None = None
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    crop_pct: float | None = Field(None, gt=0.0, le=1.0)
    workers: int | None = Field(None, ge=0)
    repeated_augment: int = Field(1, ge=1)

    @property
    def loader_workers(self) -> int:
        """DataLoader worker processes: as set, else for files (an ImageFolder, or unlabeled
        images) up to 4 that leave this process a core, and 0 for sets held in memory."""
        if self.workers is not None:
            return self.workers
        if self.name != "imagefolder" and self.unlabeled_root is None:
            return 0
        return max(1, min(4, available_cores() - 1))

    @property
    def eval_crop_pct(self) -> float:
        """The evaluation view's crop_pct: as set, else timm's 0.875 for an ImageFolder and
        1.0 (the whole image) for the small in-memory sets."""
        if self.crop_pct is not None:
            return self.crop_pct
        return IMAGEFOLDER_CROP_PCT if self.name == "imagefolder" else 1.0


class AugmentConfig(_Strict):
    """The student's augmentation, applied before the view goes to the teacher.

    `crop: resized` cuts a RandomResizedCrop: `crop_scale` is its share of the original
    image's area, `crop_ratio` its aspect range ((0.08, 1.0) with (3/4, 4/3) is the
    RandomResizedCrop of torchvision, timm, DeiT and DIST; big_vision's inception crop for
    FunMatch takes (0.05, 1.0)); `crop: padded` is CIFAR's RandomCrop(32, padding=4)
    (mdistiller's), with `crop_padding`.
    """

    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop: Literal["resized", "padded"] = "resized"
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)
    switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    randaugment_layers: int = Field(0, ge=0)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    erasing_prob: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        low, high = self.crop_scale
        if not (0.0 < low <= high <= 1.0):
            raise ValueError(
                f"augment.crop_scale must be (low, high) with 0 < low <= high <= 1, "
                f"got {list(self.crop_scale)}"
            )
        low, high = self.crop_ratio
        if not (0.0 < low <= high):
            raise ValueError(
                f"augment.crop_ratio must be (low, high) with 0 < low <= high, "
                f"got {list(self.crop_ratio)}"
            )
        return self

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


TeachingMode = Literal["consistent", "function_matching", "fixed", "independent"]
FUNCTION_MATCHING_MIXUP_ALPHA = 1.0
"""FunMatch mixes every batch with lam ~ Beta(1, 1) (big_vision's distillation configs)."""


class TeachingConfig(_Strict):
    """What the teacher sees of each training image (FunMatch, Beyer et al. 2022, section 3).

    `consistent`: the student's own crop. `function_matching`: that, mixed (mixup) on every
    batch. `fixed`: one fixed view per image (`fixed_view`), its logits asked once and kept in
    `cache`, while the student trains on random crops. `independent`: a crop of its own.
    """

    mode: TeachingMode = "consistent"
    fixed_view: Literal["center_crop", "resize"] = "center_crop"
    cache: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value


class LossConfig(_Strict):
    """A registered loss (`ce` trains on labels alone); unset values take its recipe's."""

    name: str = "kd"
    hyperparameters: dict[str, float | str] = {}
    ce_weight: float | None = Field(None, ge=0.0)
    kd_weight: float | None = Field(None, ge=0.0)
    warmup_epochs: int | None = Field(None, ge=0)
    label_smoothing: float | None = Field(None, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _known(self) -> LossConfig:
        self.objective(losses.SMALL_IMAGE_MAX_SIZE)  # the name, keys and values are checked
        return self

    @property
    def needs_teacher(self) -> bool:
        return losses.get(self.name).needs_teacher

    def objective(self, image_size: int) -> Objective:
        """The loss's objective at `image_size`, with this config's values over its recipe's."""
        weights = {
            key: getattr(self, key)
            for key in ObjectiveWeights.model_fields
            if getattr(self, key) is not None
        }
        return losses.get(self.name).objective(
            image_size, hyperparameters=self.hyperparameters, weights=weights
        )


class OptimizerConfig(_Strict):
    """SGD, Adam (L2 weight decay, as torch's), AdamW (decoupled) or RMSprop in TensorFlow's
    form (`rmsprop_tf`: eps inside the square root, as timm's RMSpropTF); `lr` is the base
    rate. `exclude_from_decay`: biases, norm weights and the tokens and position embeddings a
    model names get no weight decay (timm's rule, which DeiT and DIST's code use)."""

    name: Literal["sgd", "adam", "adamw", "rmsprop_tf"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    alpha: float = Field(0.9, gt=0.0, lt=1.0)
    eps: float = Field(1e-3, gt=0.0)
    exclude_from_decay: bool = False

    @model_validator(mode="after")
    def _betas(self) -> OptimizerConfig:
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"optimizer.betas must be in [0, 1), got {list(self.betas)}")
        if self.nesterov and self.name != "sgd":
            raise ValueError(f"optimizer.nesterov applies to sgd only, not {self.name!r}")
        return self


class ScheduleConfig(_Strict):
    """Linear warm-up per step, then cosine (down to min_lr), multistep or step decay."""

    name: Literal["cosine", "multistep", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    milestones: list[int] = []
    step_epochs: float | None = Field(None, gt=0.0)
    gamma: float = Field(0.1, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _fits_its_name(self) -> ScheduleConfig:
        if self.name == "step" and self.step_epochs is None:
            raise ValueError("schedule 'step' needs schedule.step_epochs (lr x gamma every N)")
        if self.name == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs schedule.milestones, e.g. [150, 180]")
        return self


class EmaConfig(_Strict):
    """An exponential moving average of the student's weights, updated every step, evaluated
    beside the student (`ema_*` metrics) and exported with `export --ema` (DeiT: 0.99996)."""

    decay: float | None = Field(None, gt=0.0, lt=1.0)


class TeacherSettings(_Strict):
    endpoints: list[str] = []
    model: str | None = None
    token: SecretStr | None = None
    prefetch: int = Field(3, ge=0)
    timeout_s: float = Field(60.0, gt=0.0)
    startup_wait_s: float = Field(60.0, ge=0.0)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    allow_insecure_token: bool = False

    @model_validator(mode="after")
    def _secure_endpoints(self) -> TeacherSettings:
        token = self.token.get_secret_value() if self.token else None
        tls = self.tls()
        for url in self.endpoints:
            check_endpoint(
                url, token=token, tls=tls, allow_insecure_token=self.allow_insecure_token
            )
        return self

    def tls(self) -> ClientTls | None:
        """The TLS files for https:// and grpcs:// endpoints (None: the system's roots)."""
        if (self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name) == (None,) * 4:
            return None
        return ClientTls(self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)


class StudentConfig(_Strict):
    """The student's architecture and start: `init_weights` (e.g. the teacher's, for the same
    arch) mixed as `init_interpolation * weights + (1 - it) * random` (Stanton et al. 2021,
    section 6); `drop_path` is the ViTs' stochastic depth rate (DeiT: 0.1)."""

    arch: str = "kdserve:resnet8"
    init_weights: Path | None = None
    init_interpolation: float = Field(1.0, ge=0.0, le=1.0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _interpolation_needs_weights(self) -> StudentConfig:
        if self.init_interpolation != 1.0 and self.init_weights is None:
            raise ValueError(
                f"student.init_interpolation {self.init_interpolation} needs "
                "student.init_weights (the weights to interpolate with a random start)"
            )
        return self


class RunConfig(_Strict):
    """A whole student run."""

    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    teaching: TeachingConfig = TeachingConfig()
    teacher: TeacherSettings = TeacherSettings()
    student: StudentConfig = StudentConfig()
    ema: EmaConfig = EmaConfig()
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    grad_clip: float | None = Field(None, gt=0.0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    amp: Literal["auto", "off", "float16", "bfloat16"] = "auto"
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    output_dir: Path = Path("runs/student")
    checkpoint_every: int = Field(200, ge=1)
    eval_every: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _teacher_when_distilling(self) -> RunConfig:
        if self.loss.needs_teacher and not self.teacher.endpoints:
            raise ValueError(
                f"loss {self.loss.name!r} needs a teacher: set teacher.endpoints or --teacher"
            )
        return self

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> RunConfig:
        if self.schedule.min_lr > self.optimizer.lr:
            raise ValueError(
                f"schedule.min_lr {self.schedule.min_lr} is above optimizer.lr {self.optimizer.lr}"
            )
        return self

    @model_validator(mode="after")
    def _teaching_fits(self) -> RunConfig:
        mode = self.teaching.mode
        if mode != "consistent" and not self.loss.needs_teacher:
            raise ValueError(f"teaching {mode!r} needs a distillation loss, not {self.loss.name!r}")
        if mode == "fixed" and self.augment.mixes:
            raise ValueError(
                "teaching 'fixed' keeps one answer per image, so the student's views cannot be "
                f"mixed: set augment.mixup_alpha and augment.cutmix_alpha to 0 (got "
                f"{self.augment.mixup_alpha} and {self.augment.cutmix_alpha})"
            )
        if mode == "function_matching" and self.augment.cutmix_alpha > 0:
            raise ValueError(
                "teaching 'function_matching' mixes every batch with mixup, as FunMatch: set "
                f"augment.cutmix_alpha to 0 (got {self.augment.cutmix_alpha}), or use "
                "'consistent' teaching with mixup and cutmix"
            )
        if mode != "fixed" and self.teaching.cache is not None:
            raise ValueError(f"teaching.cache is for teaching 'fixed', not {mode!r}")
        return self

    def augment_settings(self, view_size: int) -> AugmentSettings:
        """The augmentation the run draws: `function_matching` mixes every batch (mixup at
        the configured alpha, else FunMatch's 1.0)."""
        knobs = self.augment.model_dump()
        if self.teaching.mode == "function_matching":
            knobs["mix_prob"] = 1.0
            knobs["mixup_alpha"] = self.augment.mixup_alpha or FUNCTION_MATCHING_MIXUP_ALPHA
        return AugmentSettings(view_size=view_size, **knobs)

    @property
    def fixed_cache_path(self) -> Path:
        """Where `fixed` teaching keeps the teacher's answers."""
        return self.teaching.cache or self.output_dir / FIXED_CACHE


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_run_config(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """YAML file (optional) + dotted overrides such as {"loss.name": "dkd", "epochs": 3}.

    The teacher's token, when neither sets it, comes from KDSERVE_AUTH_TOKEN (the variable
    the teacher server reads), so one env file serves both sides.
    """
    raw: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    token = (os.environ if environ is None else environ).get(AUTH_TOKEN_ENV)
    if token:
        raw.setdefault("teacher", {}).setdefault("token", token)
    if isinstance(raw.get("teaching"), str):
        raw["teaching"] = {"mode": raw["teaching"]}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        source = str(path) if path is not None else "<defaults>"
        raise ConfigError(format_validation_error(exc, source)) from None
