"""The training loop, readable in one sitting: augment once, ask the teacher, step the student.

Per step: a batch of views cut from the original images in the loader's workers (crop, flip,
drawn from (seed, rank, step, position)) and the step's mix parameters -> the teacher's raw
logits for what the teaching mode shows it (`teaching`; prefetched K steps ahead) -> the
student's forward on its view -> the objective (`objective`) -> backward, clip, step. Each
step and each evaluation (every epoch, or every `eval_every` steps) goes to the run log
(`runlog`); a checkpoint every `checkpoint_every` steps and at the end or at
SIGTERM lets `--resume` continue exactly where the run stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from student_worker import distributed
from student_worker.augment import AugmentedBatch, batch_views, student_input
from student_worker.checkpoint import (
    LATEST,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from student_worker.config import RunConfig
from student_worker.data import build_datasets
from student_worker.ema import WeightsAverage
from student_worker.evaluation import Evaluator, StudentHeads
from student_worker.loading import (
    NotEnoughImages,
    epoch_sampler,
    train_loader,
    training_subset,
)
from student_worker.models import TwoHeads, has_two_heads, init_from_weights
from student_worker.optim import build_optimizer, lr_factor
from student_worker.prefetch import Prefetcher
from student_worker.runlog import RunLog
from student_worker.teacher import (
    NoTeacher,
    Teacher,
    TeacherRequests,
    TeacherUnreachable,
    connect_teacher,
)
from student_worker.teaching import FixedCacheMismatch, FixedTargets, fixed_targets
from student_worker.views import StepBatches, model_noise_seed
from teacher_server.shared.archs import NoStochasticDepth, create_model
from teacher_server.shared.contract import Mix

log = logging.getLogger(__name__)


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
    sample_ids: torch.Tensor
    data_wait_s: float


class Trainer:
    """One student run: data, student, teacher, objective, optimizer, schedule, checkpoints.

    Under `torchrun` each process is one rank of the same student (`student_worker.distributed`).
    `teacher` replaces the configured teacher server (e.g. a model in this process, for
    comparisons); it gets each view at the student's size.
    """

    def __init__(
        self, config: RunConfig, *, resume: bool = False, teacher: Teacher | None = None
    ) -> None:
        self.config = config
        self.out = config.output_dir
        self.run_log = RunLog(self.out)
        if not resume and (self.out / LATEST).exists():
            raise TrainingError(
                f"{self.out} already holds a run; pass --resume to continue it "
                "or choose another --output-dir"
            )
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
        student = config.student
        try:
            self.model = create_model(
                student.arch, self.info.num_classes, self.student_size, drop_path=student.drop_path
            )
        except NoStochasticDepth as exc:
            raise TrainingError(f"student.drop_path: {exc}") from None
        if student.init_weights is not None:
            init_from_weights(self.model, student.init_weights, student.init_interpolation)
        self.model.to(self.device)
        self.heads = TwoHeads(self.model)
        self.ema = WeightsAverage(self.model, config.ema.decay) if config.ema.decay else None
        self.mean = torch.tensor(config.student.mean, device=self.device)
        self.std = torch.tensor(config.student.std, device=self.device)
        self.objective = config.loss.objective(size)
        self.teacher = teacher if config.loss.needs_teacher else None
        self._connection: TeacherRequests | None = None
        view_size = size
        if config.loss.needs_teacher and self.teacher is None:
            try:
                self._connection, teacher_size = connect_teacher(
                    config.teacher,
                    num_classes=self.info.num_classes,
                    data_name=self.info.name,
                    run_name=f"{config.output_dir.name}-{self.world.rank}",
                )
            except TeacherUnreachable:
                raise  # not a TrainingError: the CLI's exit code tells it apart
            except NoTeacher as exc:
                raise TrainingError(str(exc)) from None
            self.teacher = self._connection
            # FunMatch: the view is cut at the larger resolution and resized for each model.
            view_size = max(size, *teacher_size)
        self.view_size = view_size
        self.augment = config.augment_settings(view_size)
        self.train_subset = training_subset(self.train_set, config.loss.needs_teacher)
        try:
            self.sampler = epoch_sampler(config, len(self.train_subset), self.world)
        except NotEnoughImages as exc:
            raise TrainingError(str(exc)) from None
        self.step_batches = StepBatches()
        self.loader = train_loader(
            config, self.train_set, self.augment, self.step_batches, self.world.rank, self.device
        )
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(config.optimizer, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                config.schedule, step, self.steps_per_epoch, self.total_steps, config.optimizer.lr
            ),
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.evaluator = Evaluator(
            self.eval_set,
            self.train_set,
            self.teacher,
            two_heads=has_two_heads(self.model),
            view_size=view_size,
            crop_pct=config.data.eval_crop_pct,
            workers=config.data.loader_workers,
        )
        self.step = 0
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._stop_requested = False
        if resume:
            self._resume()
        distributed.join(self.world, self.device)
        self.network: torch.nn.Module = self.heads
        if self.world.distributed:
            self.network = DistributedDataParallel(
                self.heads,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.fixed_targets = self._fixed_targets() if config.teaching.mode == "fixed" else None

    def _fixed_targets(self) -> FixedTargets:
        """`fixed` teaching's answers: rank 0 fills the cache (asking the teacher once per
        image), the other ranks then read it (or fill their own, off a shared disk)."""
        if self.teacher is None:
            raise TrainingError("teaching 'fixed' needs a teacher")
        try:
            targets = None
            if self.world.is_main:
                targets = fixed_targets(
                    self.config, self.train_set, self.info.name, self.view_size, self.teacher
                )
            distributed.barrier(self.world)
            return targets or fixed_targets(
                self.config,
                self.train_set,
                self.info.name,
                self.view_size,
                self.teacher,
                show_progress=False,
            )
        except FixedCacheMismatch as exc:
            raise TrainingError(str(exc)) from None

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
            if self._connection is not None:
                self._connection.close()
            distributed.leave(self.world)
        return metrics

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch's steps (from the current one); the last mid-epoch evaluation, if any."""
        metrics: dict[str, float] = {}
        self.network.train()
        started, images, data_wait_s = time.monotonic(), 0, 0.0
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
            for item, teacher_logits in self._with_teacher(self._steps(epoch, done_before)):
                loss, parts = self._train_step(item, teacher_logits)
                data_wait_s += item.data_wait_s
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
                    "data_wait_share": data_wait_s / max(1e-9, time.monotonic() - started),
                }
                if self.world.is_main:
                    self.run_log.append(record)
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

    def _epoch_steps(self, epoch: int) -> int:
        """How many steps epoch `epoch` has: all of them, or fewer in the run's last one."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def _steps(self, epoch: int, skip: int) -> Iterator[Step]:
        """This epoch's batches from batch `skip` on, each with its views and mix.

        A step's crops come from (seed, rank, step, position) and its mixing from (seed, rank,
        step) alone, so a resumed run draws the same views without saving any augmentation
        state; a resumed run loads no skipped image, and no batch past the run's last step is
        drawn. `data_wait_s` is how long the step waited for its batch.
        """
        self.sampler.set_epoch(epoch)
        order = [int(self.train_subset.indices[i]) for i in self.sampler]
        size = self.config.batch_size
        batches = [order[i : i + size] for i in range(0, self._epoch_steps(epoch) * size, size)]
        first = epoch * self.steps_per_epoch + skip
        self.step_batches.set(first, batches[skip:])
        loader = iter(self.loader)
        for step in range(first, first + len(self.step_batches)):
            waited = time.monotonic()
            batch = next(loader)
            data_wait_s = time.monotonic() - waited
            views = batch_views(
                self.augment,
                batch.views,
                batch.labels,
                seed=self.config.seed,
                rank=self.world.rank,
                step=step,
                teacher_view=batch.teacher_views,
            )
            yield Step(step, epoch, views, batch.sample_ids, data_wait_s)

    def _with_teacher(self, steps: Iterator[Step]) -> Iterator[tuple[Step, torch.Tensor | None]]:
        """Each step with the teacher's raw logits for what it is shown, asked K steps ahead
        (`fixed`: the kept answers for the step's images)."""
        if self.teacher is None:
            for step in steps:
                yield step, None
            return
        if self.fixed_targets is not None:
            for step in steps:
                yield step, self.fixed_targets(step.sample_ids)
            return
        teacher = self.teacher
        prefetch: Prefetcher[Step] = Prefetcher(
            lambda item: teacher.logits(
                f"step-{item.index}", item.batch.teacher_input, item.batch.mix
            ),
            depth=self.config.teacher.prefetch,
        )
        yield from prefetch(steps)

    def _train_step(
        self, item: Step, teacher_logits: torch.Tensor | None
    ) -> tuple[float, dict[str, float]]:
        batch = item.batch
        torch.manual_seed(model_noise_seed(self.config.seed, self.world.rank, self.step))
        class_logits, distill_logits = self._student_logits(self.network, batch.view, batch.mix)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.to(self.device, non_blocking=True)
        total, parts = self.objective(
            class_logits, distill_logits, teacher_logits, batch.targets.to(self.device), item.epoch
        )
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(self.scaler.scale(total))
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return float(total.detach()), parts

    def _student_logits(
        self, network: torch.nn.Module, view: torch.Tensor, mix: Mix | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's (class, distillation) logits on its own float input from the view."""
        view = view.to(self.device, non_blocking=True)
        inputs = student_input(view, mix, self.student_size, self.mean, self.std)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            heads: tuple[torch.Tensor, torch.Tensor] = network(inputs)
        return heads

    # ---- evaluation, state --------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """Rank 0 evaluates (`evaluation.Evaluator`) and logs while the other ranks wait."""
        metrics: dict[str, float] = {}
        if self.world.is_main:
            self.heads.eval()
            students: dict[str, StudentHeads] = {
                "": lambda images: self._student_logits(self.heads, images, None)
            }
            if self.ema is not None:
                average = TwoHeads(self.ema.module)
                students["ema_"] = lambda images: self._student_logits(average, images, None)
            metrics = self.evaluator.evaluate(students)
            self.run_log.append({"kind": "eval", "step": self.step, "epoch": epoch, **metrics})
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            self.heads.train()
        distributed.barrier(self.world)
        return metrics

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
            "ema": self.ema.state_dict() if self.ema is not None else {},
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
        if self.ema is not None:
            if not state.get("ema"):
                raise TrainingError(f"{self.out} was trained without ema: it cannot resume with it")
            self.ema.load_state_dict(state["ema"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.world.is_main:
            self.run_log.forget_after(self.step)
        log.info("resumed %s at step %d", self.out, self.step)

    @property
    def stopped_early(self) -> bool:
        """The run stopped (SIGTERM) before its last step, after a checkpoint."""
        return self._stop_requested and self.step < self.total_steps

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM: finishing this step, writing a checkpoint and stopping")
        self._stop_requested = True
