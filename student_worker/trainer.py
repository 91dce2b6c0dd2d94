"""The training loop, readable in one sitting: augment once, ask the teacher, step the student.

Per step: a uint8 batch -> one consistent view (crop, flip, mix parameters) -> the teacher's
raw logits for that view (prefetched K steps ahead) -> the student's forward on the same
view -> ce_weight * CE(mixed labels, labeled samples only) + ramp * kd_weight * distillation
-> backward, clip, step. Every epoch: accuracy and fidelity against the teacher on the
held-out split (teacher logits fetched once and cached), written as JSON lines.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from student_worker import distributed
from student_worker.augment import (
    AugmentedBatch,
    AugmentSettings,
    ConsistentViews,
    MixedLabels,
    student_input,
)
from student_worker.checkpoint import (
    LATEST,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from student_worker.config import RunConfig
from student_worker.data import build_datasets, collate_uint8
from student_worker.losses import TRAINER_SETTINGS, LossFn, build, defaults
from student_worker.metrics import FidelityMeter
from student_worker.models import TwoHeads, has_two_heads
from student_worker.prefetch import Prefetcher, Teacher, TeacherRequests
from student_worker.report import METRICS_FILE
from teacher_server.archs import create_model
from teacher_server.client import TeacherClient
from teacher_server.weights import load_weights

log = logging.getLogger(__name__)
TRAIN_PROBE = 512


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: `auto` is float16 on CUDA (with a grad scaler) and off elsewhere."""
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else None
    return None if setting == "off" else getattr(torch, setting)


class TrainingError(RuntimeError):
    """The run cannot start or go on; the message says what to change."""


@dataclass(frozen=True)
class Step:
    """One training step's batch, as the prefetcher carries it."""

    index: int
    epoch: int
    batch: AugmentedBatch


class Trainer:
    """One student run: data, student, teacher connection, optimizer, schedule, checkpoints.

    Under `torchrun` each process is one rank of the same student (`student_worker.distributed`).
    """

    def __init__(self, config: RunConfig, *, resume: bool = False) -> None:
        self.config = config
        self.world = distributed.world_from_env()
        try:
            self.device = distributed.rank_device(self.world, config.device)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        self.amp_dtype = amp_dtype(config.amp, self.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        data = config.data
        self.train_set, self.eval_set, self.info = build_datasets(
            data.name,
            root=data.root,
            eval_root=data.eval_root,
            image_size=data.image_size,
            labeled_fraction=data.labeled_fraction,
            seed=config.seed,
            eval_fraction=data.eval_fraction,
            unlabeled_root=data.unlabeled_root,
        )
        size = self.info.image_size
        self.student_size = (size, size)
        self.model = create_model(config.student.arch, self.info.num_classes, self.student_size)
        if config.student.init_weights is not None:
            load_weights(self.model, config.student.init_weights)
        self.model.to(self.device)
        self.heads = TwoHeads(self.model)
        self.mean = torch.tensor(config.student.mean, device=self.device)
        self.std = torch.tensor(config.student.std, device=self.device)
        self.recipe = self._recipe()
        self.distill: LossFn | None = None
        self.teacher: Teacher | None = None
        view_size = size
        if config.loss.name != "ce":
            self.distill = build(
                config.loss.name,
                **{k: v for k, v in self.recipe.items() if k not in TRAINER_SETTINGS},
            )
            self.teacher, view_size = self._connect_teacher()
        self.augment = AugmentSettings(
            view_size=view_size,
            crop_scale=config.augment.crop_scale,
            flip=config.augment.flip,
            mixup_alpha=config.augment.mixup_alpha,
            cutmix_alpha=config.augment.cutmix_alpha,
            mix_prob=config.augment.mix_prob,
            switch_prob=config.augment.switch_prob,
        )
        self.sampler = self._sampler()
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.step = 0
        self.out = config.output_dir
        if not resume and (self.out / LATEST).exists():
            raise TrainingError(
                f"{self.out} already holds a run; pass --resume to continue it "
                "or choose another --output-dir"
            )
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._teacher_cache: dict[str, list[torch.Tensor]] = {}
        self._stop_requested = False
        if resume:
            self._resume()
        distributed.join(self.world, self.device)
        self.network: torch.nn.Module = self.heads
        if self.world.distributed:
            self.network = DistributedDataParallel(
                self.heads,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.distill is None and has_two_heads(self.model),
            )

    # ---- set-up -------------------------------------------------------------------------

    def _recipe(self) -> dict[str, Any]:
        loss = self.config.loss
        recipe: dict[str, Any] = (
            {"ce_weight": 1.0, "kd_weight": 0.0, "warmup_epochs": 0, "label_smoothing": 0.0}
            if loss.name == "ce"
            else defaults(loss.name, self.info.image_size)
        )
        recipe.update(loss.hyperparameters)
        for key in TRAINER_SETTINGS:
            if getattr(loss, key) is not None:
                recipe[key] = getattr(loss, key)
        return recipe

    def _connect_teacher(self) -> tuple[Teacher, int]:
        """The served teacher and the view size to send it (the larger of both input sizes)."""
        settings = self.config.teacher
        token = settings.token.get_secret_value() if settings.token else None
        client = TeacherClient.connect(
            settings.endpoints, token=token, timeout_s=settings.timeout_s
        )
        served = {m.name: m for m in client.list_models()}
        name = settings.model or (next(iter(served)) if len(served) == 1 else None)
        if name not in served:
            raise TrainingError(
                f"teacher model {name!r} is not served at {settings.endpoints}; "
                f"available: {sorted(served)}"
            )
        info = served[name]
        if info.num_classes != self.info.num_classes:
            raise TrainingError(
                f"the teacher {name!r} has {info.num_classes} classes but the data set "
                f"{self.info.name!r} has {self.info.num_classes}"
            )
        run_id = f"{self.config.output_dir.name}-{self.world.rank}-{uuid.uuid4().hex[:8]}"
        view_size = max(self.info.image_size, *info.input_size)
        return TeacherRequests(client, name, run_id=run_id), view_size

    def _sampler(self) -> DistributedSampler[int]:
        """This rank's share of each epoch, shuffled by (seed, epoch) alone, so a resumed run
        sees the same order; a CE-only student sees the labeled samples alone."""
        everything = range(len(self.train_set))
        labeled = self.train_set.labeled_indices().tolist()
        self.train_subset = Subset(
            self.train_set, labeled if self.config.loss.name == "ce" else everything
        )
        sampler: DistributedSampler[int] = DistributedSampler(
            self.train_subset,
            num_replicas=self.world.size,
            rank=self.world.rank,
            shuffle=True,
            seed=self.config.seed,
            drop_last=True,
        )
        if len(sampler) < self.config.batch_size:
            raise TrainingError(
                f"batch_size {self.config.batch_size} is larger than the {len(sampler)} "
                f"training images of each of the {self.world.size} rank(s)"
            )
        return sampler

    def _epoch_steps(self, epoch: int) -> int:
        """How many steps epoch `epoch` has: all of them, or fewer in the run's last one."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def _loader(self, epoch: int, skip: int) -> DataLoader[tuple[torch.Tensor, int, int]]:
        """The epoch's full batches from batch `skip` on, up to the run's last step (a resumed
        run loads no skipped image; the prefetcher asks for no batch past the end)."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        size = self.config.batch_size
        batches = [order[i : i + size] for i in range(0, self._epoch_steps(epoch) * size, size)]
        return DataLoader(
            self.train_subset,
            batch_sampler=batches[skip:],
            collate_fn=collate_uint8,
            num_workers=self.config.data.workers,
            # Its own generator for the loader's base seed, so the global RNG (saved in
            # checkpoints) is not drawn from at each epoch's start.
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _optimizer(self) -> torch.optim.Optimizer:
        settings = self.config.optimizer
        if settings.name == "adamw":
            return torch.optim.AdamW(
                self.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
            )
        return torch.optim.SGD(
            self.model.parameters(),
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
            weight_decay=settings.weight_decay,
        )

    def _lr_factor(self, step: int) -> float:
        schedule = self.config.schedule
        warmup = schedule.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        if schedule.name == "multistep":
            epoch = step // self.steps_per_epoch
            return float(schedule.gamma ** sum(epoch >= m for m in schedule.milestones))
        progress = (step - warmup) / max(1.0, self.total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # ---- the loop -----------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to the end (or to SIGTERM, after a checkpoint); returns the last evaluation."""
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if in_main_thread else None
        metrics: dict[str, float] = {}
        try:
            while self.step < self.total_steps and not self._stop_requested:
                epoch = self.step // self.steps_per_epoch
                metrics = self._train_epoch(epoch) or metrics
                # A SIGTERM after the epoch's last step is agreed on here, so every rank stops.
                self._stop_requested = distributed.any_rank(
                    self.world, self._stop_requested, self.device
                )
                if self._stop_requested:
                    break
                # With eval_every, the last step is evaluated here, never twice (the loop
                # above stops before its own check on the last step).
                if self.config.eval_every is None or self.step >= self.total_steps:
                    metrics = self.evaluate(epoch + 1) or metrics
            self._checkpoint()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            distributed.leave(self.world)
        return metrics

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch's steps (from the current one); the last mid-epoch evaluation, if any."""
        metrics: dict[str, float] = {}
        self.network.train()
        started, images = time.monotonic(), 0
        done_before = self.step - epoch * self.steps_per_epoch
        # A bar on a terminal; logs get metrics.jsonl instead (tqdm disables itself off a TTY).
        with tqdm(
            total=self._epoch_steps(epoch),
            initial=done_before,
            desc=f"epoch {epoch + 1}",
            unit="step",
            disable=None if self.world.is_main else True,
            leave=False,
        ) as bar:
            for item, teacher_logits in self._fetching(self._steps(epoch, done_before)):
                loss, parts = self._train_step(item, teacher_logits)
                images += item.batch.view.shape[0] * self.world.size
                self.step += 1
                stop = distributed.any_rank(self.world, self._stop_requested, self.device)
                self._stop_requested = stop
                if self.step % self.config.checkpoint_every == 0:
                    self._checkpoint()
                record = {
                    "kind": "train",
                    "step": self.step,
                    "epoch": epoch + 1,
                    "loss": loss,
                    **parts,
                    "lr": self.scheduler.get_last_lr()[0],
                    "images_per_s": images / max(1e-9, time.monotonic() - started),
                    "teacher_ms": self.teacher.round_trip_s * 1e3 if self.teacher else 0.0,
                }
                self._write(record)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    img_s=f"{record['images_per_s']:.0f}",
                    teacher_ms=f"{record['teacher_ms']:.1f}",
                    refresh=False,
                )
                bar.update()
                if stop or self.step >= self.total_steps:
                    break
                if self.config.eval_every and self.step % self.config.eval_every == 0:
                    metrics = self.evaluate(epoch + 1)
        return metrics

    def _steps(self, epoch: int, skip: int) -> Iterator[Step]:
        """This epoch's batches from batch `skip` on, each with its own consistent view.

        A step's crops and mixing are drawn from (seed, rank, step) alone, so a resumed run
        draws the same views without saving any augmentation state.
        """
        for index, (images, labels, _) in enumerate(self._loader(epoch, skip), start=skip):
            step = epoch * self.steps_per_epoch + index
            views = ConsistentViews(self.augment, seed=(self.config.seed, self.world.rank, step))
            yield Step(step, epoch, views(images, labels))

    def _fetching(self, steps: Iterator[Step]) -> Iterator[tuple[Step, torch.Tensor | None]]:
        if self.teacher is None:
            for step in steps:
                yield step, None
            return
        teacher = self.teacher
        prefetch: Prefetcher[Step] = Prefetcher(
            lambda item: teacher.logits(item.index, item.batch.view, item.batch.mix),
            depth=self.config.teacher.prefetch,
        )
        yield from prefetch(steps)

    def _train_step(
        self, item: Step, teacher_logits: torch.Tensor | None
    ) -> tuple[float, dict[str, float]]:
        batch = item.batch
        view = batch.view.to(self.device, non_blocking=True)
        inputs = student_input(view, batch.mix, self.student_size, self.mean, self.std)
        targets = batch.targets.to(self.device)
        with self._autocast():
            class_logits, distill_logits = self.network(inputs)
        ce = self._mixed_cross_entropy(class_logits.float(), targets)
        total = self.recipe["ce_weight"] * ce
        parts = {"ce": float(ce.detach())}
        if self.distill is not None and teacher_logits is not None:
            teacher_logits = teacher_logits.to(self.device, non_blocking=True)
            dominant = targets.dominant
            dominant = torch.where(dominant < 0, teacher_logits.argmax(dim=1), dominant)
            distill = self.distill(distill_logits, teacher_logits, dominant)
            total = total + self._ramp(item.epoch) * self.recipe["kd_weight"] * distill
            parts["distill"] = float(distill.detach())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(total.detach()), parts

    def _autocast(self) -> torch.autocast:
        """The forward's AMP context (a no-op when `amp` is off)."""
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def _mixed_cross_entropy(self, logits: torch.Tensor, targets: MixedLabels) -> torch.Tensor:
        """lam * CE(y_a) + (1 - lam) * CE(y_b) over samples whose both labels are known."""
        labeled = (targets.labels_a >= 0) & (targets.labels_b >= 0)
        if not bool(labeled.any()):
            return logits.sum() * 0.0
        smoothing = float(self.recipe["label_smoothing"])
        chosen = logits[labeled]
        loss_a = F.cross_entropy(chosen, targets.labels_a[labeled], label_smoothing=smoothing)
        if targets.lam == 1.0:
            return loss_a
        loss_b = F.cross_entropy(chosen, targets.labels_b[labeled], label_smoothing=smoothing)
        return targets.lam * loss_a + (1.0 - targets.lam) * loss_b

    def _ramp(self, epoch: int) -> float:
        warmup = int(self.recipe["warmup_epochs"])
        return 1.0 if warmup == 0 else min(1.0, (epoch + 1) / warmup)

    # ---- evaluation, state, logs --------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """Accuracy and fidelity on the held-out split, and fidelity on a fixed training subset.

        The training subset (the first TRAIN_PROBE images, unaugmented) separates optimisation
        from generalisation (Stanton et al. 2021): low agreement there means the student does
        not even match the teacher on what it trained on. DeiT students also report each head.
        Rank 0 evaluates while the other ranks wait.
        """
        metrics: dict[str, float] = {}
        if self.world.is_main:
            self.heads.eval()
            meter, heads = self._measure("eval", self.eval_set)
            metrics = meter.compute()
            if self.teacher is None:
                keep = ("student_accuracy", "nll", "ece", "samples")
                metrics = {key: metrics[key] for key in keep}
            else:
                probe = Subset(self.train_set, range(min(TRAIN_PROBE, len(self.train_set))))
                train_metrics = self._measure("train", probe)[0].compute()
                metrics["train_agreement"] = train_metrics["agreement"]
                metrics["train_kl"] = train_metrics["kl"]
            metrics.update(heads)
            self._write({"kind": "eval", "step": self.step, "epoch": epoch, **metrics})
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            self.heads.train()
        distributed.barrier(self.world)
        return metrics

    def _measure(
        self, split: str, dataset: Dataset[tuple[torch.Tensor, int, int]]
    ) -> tuple[FidelityMeter, dict[str, float]]:
        """Student vs teacher on unaugmented images (the teacher's answers are fetched once),
        and, for a two-head student, each head's accuracy on the labeled images."""
        batches = list(DataLoader(dataset, batch_size=256, collate_fn=collate_uint8))
        if self.teacher is not None and split not in self._teacher_cache:
            self._teacher_cache[split] = [
                self.teacher.logits(-1 - index, images, None)
                for index, (images, _, _) in enumerate(batches)
            ]
        meter = FidelityMeter()
        correct = {"class_head_accuracy": 0, "distillation_head_accuracy": 0}
        labeled_count = 0
        for index, (images, labels, _) in enumerate(batches):
            view = images.to(self.device, non_blocking=True)
            inputs = student_input(view, None, self.student_size, self.mean, self.std)
            with self._autocast():
                class_logits, distill_logits = self.heads(inputs)
            class_logits, distill_logits = class_logits.float().cpu(), distill_logits.float().cpu()
            logits = (class_logits + distill_logits) / 2
            teacher = self._teacher_cache[split][index] if self.teacher is not None else logits
            meter.update(logits, teacher, labels)
            labeled = labels >= 0
            labeled_count += int(labeled.sum())
            correct["class_head_accuracy"] += int((class_logits.argmax(1) == labels)[labeled].sum())
            correct["distillation_head_accuracy"] += int(
                (distill_logits.argmax(1) == labels)[labeled].sum()
            )
        heads = (
            {k: v / labeled_count for k, v in correct.items()}
            if has_two_heads(self.model) and labeled_count
            else {}
        )
        return meter, heads

    def _checkpoint(self) -> None:
        if self.world.is_main:
            save_checkpoint(self.out, self._state())

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.config.model_dump(mode="json", exclude={"teacher": {"token"}}),
        }

    def _resume(self) -> None:
        state = load_checkpoint(self.out)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.world.is_main:
            self._forget_records_after(self.step)
        log.info("resumed %s at step %d", self.out, self.step)

    def _forget_records_after(self, step: int) -> None:
        """Drop the metrics a killed run logged after its checkpoint: they are trained again."""
        path = self.out / METRICS_FILE
        if not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            tmp = path.with_name(f".{METRICS_FILE}.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)

    def _write(self, record: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        with open(self.out / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM: finishing this step, writing a checkpoint and stopping")
        self._stop_requested = True


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every JSON line a run wrote."""
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
