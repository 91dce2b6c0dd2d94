"""What the teacher sees of each training image: FunMatch's four teaching modes.

`consistent` and `function_matching` send the student's own (mixed) view and `independent`
a crop of its own (`views.TrainViews`); each costs one teacher forward per image per step.
`fixed` asks the teacher once per image, about one fixed view, and keeps the answers here: a
file of logits by sample id, with what they were computed for (data, view, teacher) in its
metadata, checked before it is used (and against the teacher's fresh answers on a few
images, so a teacher retrained under the same name is caught), and filled in chunks so an
interrupted run keeps what it already asked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from student_worker.config import RunConfig
from student_worker.data import ImageSet, collate_uint8, image_digest
from student_worker.teacher import Teacher
from student_worker.views import EvalViews

log = logging.getLogger(__name__)

FIXED_BATCH = 256
SAVE_EVERY_S = 30.0
CHECK_IMAGES = 8
CHECK_TOLERANCE = 0.01
"""A reused cache is checked against the teacher's fresh answers on CHECK_IMAGES images:
they may differ by CHECK_TOLERANCE x (1 + the largest kept logit) (float16 serving or another
device), not more."""
AskTeacher = Callable[[str, torch.Tensor], torch.Tensor]
"""(request tag, uint8 views) -> the teacher's raw logits for them."""


class FixedCacheMismatch(ValueError):
    """A `fixed` cache was computed for other images, views or teacher."""


@dataclass(frozen=True)
class FixedCacheKey:
    """What a `fixed` cache's answers depend on; every field must match to reuse it."""

    data: str
    images: int
    image_digest: str
    num_classes: int
    view_size: int
    fixed_view: str
    crop_pct: float | None
    teacher: str

    def metadata(self) -> dict[str, str]:
        return {"key": json.dumps(asdict(self), sort_keys=True)}


def fixed_view_crop_pct(fixed_view: str, crop_pct: float) -> float | None:
    """The eval-view crop_pct of a `fixed` view: centre crop at crop_pct, or None (resize)."""
    return crop_pct if fixed_view == "center_crop" else None


class FixedTargets:
    """The teacher's logits for one fixed view of every training image, by sample id."""

    def __init__(self, logits: torch.Tensor, done: torch.Tensor) -> None:
        self.logits = logits
        self.done = done

    def __call__(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """The kept logits of `sample_ids` (a batch's)."""
        return self.logits.index_select(0, sample_ids)

    @classmethod
    def prepare(
        cls,
        path: Path,
        key: FixedCacheKey,
        images: ImageSet,
        ask: AskTeacher,
        *,
        workers: int = 0,
        show_progress: bool = True,
    ) -> FixedTargets:
        """Load the cache at `path` (checked against `key`) and ask the teacher for the images
        it lacks, FIXED_BATCH at a time, saving every SAVE_EVERY_S and at the end."""
        targets = cls._load(path, key) if path.exists() else None
        if targets is None:
            targets = cls(
                torch.zeros((key.images, key.num_classes), dtype=torch.float32),
                torch.zeros(key.images, dtype=torch.bool),
            )
        else:
            targets._check_teacher(path, key, images, ask)
        missing = torch.nonzero(~targets.done).flatten().tolist()
        if not missing:
            return targets
        log.info(
            "fixed teaching: asking the teacher about %d of %d images", len(missing), key.images
        )
        views = EvalViews(Subset(images, missing), key.view_size, key.crop_pct)
        loader = DataLoader(
            views,
            batch_size=FIXED_BATCH,
            collate_fn=collate_uint8,
            num_workers=workers,
            generator=torch.Generator(),  # the global RNG is the run's, saved in checkpoints
        )
        saved = time.monotonic()
        with tqdm(
            total=len(missing),
            desc="fixed teacher views",
            unit="img",
            disable=None if show_progress else True,
        ) as bar:
            for batch, (pixels, _, sample_ids) in enumerate(loader):
                targets.logits[sample_ids] = ask(f"fixed-{batch}", pixels).float().cpu()
                targets.done[sample_ids] = True
                bar.update(len(sample_ids))
                if time.monotonic() - saved > SAVE_EVERY_S:
                    targets.save(path, key)
                    saved = time.monotonic()
        targets.save(path, key)
        return targets

    def _check_teacher(
        self, path: Path, key: FixedCacheKey, images: ImageSet, ask: AskTeacher
    ) -> None:
        """Ask the teacher again about a few kept images: a teacher retrained or reloaded
        under the same name answers otherwise, and its old answers must not be reused."""
        kept = torch.nonzero(self.done).flatten()[:CHECK_IMAGES].tolist()
        if not kept:
            return
        views = EvalViews(Subset(images, kept), key.view_size, key.crop_pct)
        pixels = torch.stack([views[index][0] for index in range(len(kept))])
        fresh = ask("fixed-check", pixels).float().cpu()
        stored = self.logits[kept]
        difference = float((fresh - stored).abs().max())
        tolerance = CHECK_TOLERANCE * (1.0 + float(stored.abs().max()))
        if difference > tolerance:
            raise FixedCacheMismatch(
                f"teaching.cache {path} holds other answers than teacher {key.teacher!r} gives "
                f"now (logits differ by up to {difference:.3g} on {len(kept)} images, more "
                f"than {tolerance:.3g}): the teacher changed; delete the cache or point "
                "teaching.cache elsewhere"
            )

    @classmethod
    def _load(cls, path: Path, key: FixedCacheKey) -> FixedTargets:
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                stored = json.loads((handle.metadata() or {}).get("key", "{}"))
                logits, done = handle.get_tensor("logits"), handle.get_tensor("done")
        except (OSError, ValueError, safetensors.SafetensorError) as exc:
            raise FixedCacheMismatch(
                f"teaching.cache {path} is not a kdserve fixed cache: {exc}"
            ) from None
        expected = asdict(key)
        for field, value in expected.items():
            if stored.get(field) != value:
                raise FixedCacheMismatch(
                    f"teaching.cache {path} was computed for {field} {stored.get(field)!r}, "
                    f"but this run has {field} {value!r}: delete it or point teaching.cache "
                    "elsewhere"
                )
        if logits.shape != (key.images, key.num_classes) or done.shape != (key.images,):
            raise FixedCacheMismatch(
                f"teaching.cache {path} holds logits {list(logits.shape)}, expected "
                f"[{key.images}, {key.num_classes}]"
            )
        return cls(logits.float(), done.bool())

    def save(self, path: Path, key: FixedCacheKey) -> None:
        """Write atomically (a temporary file, then a rename), so a crash keeps the last copy."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        safetensors.torch.save_file(
            {"logits": self.logits, "done": self.done}, str(tmp), metadata=key.metadata()
        )
        os.replace(tmp, path)


def fixed_cache_key(
    images: ImageSet,
    *,
    data: str,
    view_size: int,
    fixed_view: str,
    crop_pct: float,
    teacher: str,
) -> FixedCacheKey:
    """The key of a `fixed` cache for this run's training images, view and teacher."""
    return FixedCacheKey(
        data=data,
        images=len(images),
        image_digest=image_digest(images.images),
        num_classes=images.num_classes,
        view_size=view_size,
        fixed_view=fixed_view,
        crop_pct=fixed_view_crop_pct(fixed_view, crop_pct),
        teacher=teacher,
    )


def fixed_targets(
    config: RunConfig,
    train_set: ImageSet,
    data_name: str,
    view_size: int,
    teacher: Teacher,
    *,
    show_progress: bool = True,
) -> FixedTargets:
    """A run's `fixed` answers, from its cache file, asking `teacher` for what it lacks."""
    key = fixed_cache_key(
        train_set,
        data=data_name,
        view_size=view_size,
        fixed_view=config.teaching.fixed_view,
        crop_pct=config.data.eval_crop_pct,
        teacher=getattr(teacher, "model", type(teacher).__name__),
    )
    return FixedTargets.prepare(
        config.fixed_cache_path,
        key,
        train_set,
        lambda tag, views: teacher.logits(tag, views, None),
        workers=config.data.loader_workers,
        show_progress=show_progress,
    )
