"""Training views per second per DataLoader worker against torchvision's ImageNet transform,
and the share of a student step spent waiting for data, measured in one run.

On one seeded JPEG ImageFolder written to a temporary directory (2 classes, sizes drawn
around ImageNet's typical 500 x 375, smooth gradients at three scales plus pixel noise,
quality 90, so the files compress and decode like photos rather than like pure noise):
- `kdserve`: the student's training views, `TrainViews` over `load_image_folder` (each file
  decoded at full size with PIL, a RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) cut
  from the original and resized once on uint8, then a flip) through a DataLoader with
  `StepBatches` and `collate_views`, as the trainer's loader;
- `torchvision`: `datasets.ImageFolder` with the standard ImageNet train transform
  (RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize) and the default collate;
- `torchvision uint8`: the same crop and flip ending in PILToTensor (uint8, no normalization),
  to show how much of the difference is the float conversion alone.
All at batch 64 with persistent workers (a warm-up pass excluded), one pass over the folder
per measurement, in turn, kdserve first, each round; the medians are printed for
1 and 2 workers. The two do not hand over the same thing, and that is part of what is
compared: kdserve's batch is uint8 (normalized later, on the student's device and on the
teacher server), torchvision's is normalized float32 (4x the bytes through shared memory).
Target: kdserve >= 1.0x torchvision per worker.
Then a short real student run (`Trainer`, kdserve:resnet8 at 112 px, cross-entropy, batch
32, one thread) on the same folder with data.workers 0 and 1: the last step's
`data_wait_share` (the share of its epoch's wall time spent waiting for the next batch) and
images/s, from metrics.jsonl.

Run (the README records the results):
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        .venv/bin/python bench/data_throughput.py [--quick] [--workers 1 2] [--skip-train]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import DataLoader

from student_worker.config import load_run_config
from student_worker.data import load_image_folder
from student_worker.runlog import RunLog
from student_worker.trainer import Trainer
from student_worker.views import CropSettings, StepBatches, TrainViews, collate_views
from teacher_server.shared.tv import import_torchvision

torchvision = import_torchvision()
from torchvision import datasets, transforms  # noqa: E402

BATCH = 64
TRAIN_BATCH = 32
STUDENT = "kdserve:resnet8"
CLASSES = 2
EVAL_IMAGES = 16
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
HEIGHTS = (300, 500)
WIDTHS = (350, 500)
NOISE_SIGMA = 16.0
QUALITY = 90
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FolderSummary:
    images: int
    mean_kb: float
    mean_pixels: float


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray[Any, Any]:
    """RGB uint8 (height, width, 3): random colours at 4, 16 and 64 cells across, smoothly
    upsampled and summed, plus Gaussian pixel noise (sensor grain and texture)."""
    pixels = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25)):
        coarse = rng.integers(0, 256, (cells * height // width + 1, cells, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels += weight * np.asarray(smooth, np.float32)
    pixels /= 1.75
    pixels += rng.normal(0.0, NOISE_SIGMA, pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, images: int, seed: int) -> FolderSummary:
    """`images` JPEGs split evenly over `CLASSES` class folders, sizes uniform in HEIGHTS x
    WIDTHS; the same seed writes the same files."""
    rng = np.random.default_rng(seed)
    sizes, pixels = [], []
    for index in range(images):
        folder = root / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        height = int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1))
        width = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1))
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(photo_like(rng, height, width)).save(path, "JPEG", quality=QUALITY)
        sizes.append(path.stat().st_size)
        pixels.append(height * width)
    return FolderSummary(images, statistics.fmean(sizes) / 1e3, statistics.fmean(pixels))


def kdserve_pass(root: Path, size: int, workers: int) -> Callable[[int], int]:
    """A function running one pass of the trainer's loader over the folder; returns views."""
    images = load_image_folder(root, image_size=size)
    views = TrainViews(
        images, CropSettings(size, scale=SCALE, ratio=RATIO, flip=True), seed=0, rank=0
    )
    batches = StepBatches()
    loader = DataLoader(
        views,  # type: ignore[arg-type]
        batch_sampler=batches,
        collate_fn=collate_views,
        num_workers=workers,
        persistent_workers=True,
    )
    steps_per_pass = len(images) // BATCH

    def one_pass(pass_index: int) -> int:
        order = np.random.default_rng((1, pass_index)).permutation(len(images)).tolist()
        batches.set(
            pass_index * steps_per_pass,
            [order[i : i + BATCH] for i in range(0, steps_per_pass * BATCH, BATCH)],
        )
        return sum(batch.views.shape[0] for batch in loader)

    return one_pass


def torchvision_pass(
    root: Path, size: int, workers: int, *, uint8: bool = False
) -> Callable[[int], int]:
    """One pass of torchvision's standard ImageNet train pipeline over the folder; `uint8`:
    ending in PILToTensor instead of ToTensor and Normalize."""
    to_tensor = (
        [transforms.PILToTensor()]
        if uint8
        else [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=SCALE, ratio=RATIO),
            transforms.RandomHorizontalFlip(),
            *to_tensor,
        ]
    )
    folder = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(
        folder,
        batch_size=BATCH,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=True,
    )

    def one_pass(pass_index: int) -> int:
        return sum(images.shape[0] for images, _ in loader)

    return one_pass


def timed(one_pass: Callable[[int], int], pass_index: int) -> float:
    """Views per second of one pass."""
    started = time.perf_counter()
    views = one_pass(pass_index)
    return views / (time.perf_counter() - started)


@dataclass(frozen=True)
class LoaderResult:
    workers: int
    ours: list[float]
    theirs: list[float]
    theirs_uint8: list[float]

    @property
    def ratios(self) -> list[float]:
        return [o / t for o, t in zip(self.ours, self.theirs, strict=True)]

    @property
    def ratios_uint8(self) -> list[float]:
        return [o / t for o, t in zip(self.ours, self.theirs_uint8, strict=True)]


def compare_loaders(root: Path, size: int, workers: int, repeats: int) -> LoaderResult:
    """Both pipelines alive side by side, warmed up, then measured alternately."""
    ways = {
        "kdserve": kdserve_pass(root, size, workers),
        "torchvision": torchvision_pass(root, size, workers),
        "torchvision uint8": torchvision_pass(root, size, workers, uint8=True),
    }
    for one_pass in ways.values():
        one_pass(0)
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for repeat in range(1, repeats + 1):
        for name, one_pass in ways.items():
            rates[name].append(timed(one_pass, repeat))
    del ways
    gc.collect()  # the loaders' persistent workers exit with their iterators
    return LoaderResult(workers, rates["kdserve"], rates["torchvision"], rates["torchvision uint8"])


@dataclass(frozen=True)
class TrainResult:
    workers: int
    images_per_s: float
    data_wait_share: float
    first_epoch_wait_share: float
    epochs: int


def train_data_wait(
    train_root: Path, eval_root: Path, out: Path, size: int, workers: int, steps: int
) -> TrainResult:
    """A short CE run of the real Trainer; the last step's figures (and epoch 1's, which
    include starting the loader's workers)."""
    overrides: dict[str, Any] = {
        "data.name": "imagefolder",
        "data.root": str(train_root),
        "data.eval_root": str(eval_root),
        "data.image_size": size,
        "data.workers": workers,
        "augment.crop_scale": list(SCALE),
        "augment.crop_ratio": list(RATIO),
        "student.arch": STUDENT,
        "loss.name": "ce",
        "batch_size": TRAIN_BATCH,
        "max_steps": steps,
        "threads": 1,
        "device": "cpu",
        "checkpoint_every": 10**6,
        "output_dir": str(out),
    }
    trainer = Trainer(load_run_config(None, overrides))
    trainer.fit()
    del trainer
    gc.collect()
    records = RunLog(out).records("train")
    first_epoch = [record for record in records if record["epoch"] == 1]
    last = records[-1]
    return TrainResult(
        workers,
        last["images_per_s"],
        last["data_wait_share"],
        first_epoch[-1]["data_wait_share"],
        last["epoch"],
    )


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loader_table(results: Iterable[LoaderResult]) -> list[str]:
    lines = [
        "| workers | kdserve views/s | per worker | torchvision views/s | per worker "
        "| kdserve / torchvision (median) | per repeat | torchvision uint8 views/s "
        "| kdserve / torchvision uint8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        ours, theirs = statistics.median(result.ours), statistics.median(result.theirs)
        per_repeat = ", ".join(f"{ratio:.2f}" for ratio in result.ratios)
        lines.append(
            f"| {result.workers} | {ours:.0f} | {ours / result.workers:.0f} | {theirs:.0f} "
            f"| {theirs / result.workers:.0f} | {statistics.median(result.ratios):.2f}x "
            f"| {per_repeat} | {statistics.median(result.theirs_uint8):.0f} "
            f"| {statistics.median(result.ratios_uint8):.2f}x |"
        )
    return lines


def train_table(results: Iterable[TrainResult]) -> list[str]:
    lines = [
        "| data.workers | student img/s (last epoch) | data_wait_share (last epoch) "
        "| data_wait_share (epoch 1, incl. worker start) |",
        "|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result.workers} | {result.images_per_s:.0f} | {result.data_wait_share:.1%} "
            f"| {result.first_epoch_wait_share:.1%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256, help="training images (2 classes)")
    parser.add_argument("--repeats", type=int, default=9, help="measured passes per pipeline")
    parser.add_argument("--size", type=int, default=224, help="view size of the views/s part")
    parser.add_argument(
        "--train-size", type=int, default=112, help="data.image_size of the student runs"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=32, help="student steps per training run")
    parser.add_argument(
        "--train-workers", type=int, nargs="+", default=[0, 1], help="data.workers of the runs"
    )
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 128 images, 2 repeats, 8 steps"
    )
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.steps = 128, 2, 8
    if args.images < BATCH * max(args.workers):
        sys.exit(f"--images {args.images} must fill a batch of {BATCH} for each worker")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0))
    machine = (
        f"{cores} cores ({cpu_name()}), torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}, "
        f"Python {platform.python_version()}"
    )
    command = " ".join(
        [
            *(
                f"{name}={os.environ.get(name, 'unset')}"
                for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
            ),
            ".venv/bin/python bench/data_throughput.py",
            *map(shlex.quote, sys.argv[1:]),
        ]
    )
    print(f"machine: {machine}", flush=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        train_root, eval_root = workdir / "train", workdir / "eval"
        folder = write_image_folder(train_root, args.images, seed=0)
        write_image_folder(eval_root, EVAL_IMAGES, seed=1)
        folder_line = (
            f"{folder.images} JPEGs in {CLASSES} classes (+ {EVAL_IMAGES} for eval), "
            f"heights {HEIGHTS[0]}-{HEIGHTS[1]} x widths {WIDTHS[0]}-{WIDTHS[1]} "
            f"(mean {folder.mean_pixels / 1e3:.0f} kpx), gradients + noise sigma "
            f"{NOISE_SIGMA:.0f}, quality {QUALITY}, mean {folder.mean_kb:.0f} KB, seed 0"
        )
        print(f"folder: {folder_line}", flush=True)
        print(
            f"\n== views/s: batch {BATCH}, {args.size} px, crop scale {SCALE}, ratio "
            f"(3/4, 4/3), flip; {args.repeats} passes of {args.images // BATCH * BATCH} views "
            "per pipeline, in turn, after a warm-up pass",
            flush=True,
        )
        loaders = []
        for workers in args.workers:
            result = compare_loaders(train_root, args.size, workers, args.repeats)
            loaders.append(result)
            print(
                f"workers {workers}: kdserve "
                + ", ".join(f"{rate:.0f}" for rate in result.ours)
                + " | torchvision "
                + ", ".join(f"{rate:.0f}" for rate in result.theirs)
                + " | torchvision uint8 "
                + ", ".join(f"{rate:.0f}" for rate in result.theirs_uint8)
                + " views/s",
                flush=True,
            )
        trains = []
        if not args.skip_train:
            print(
                f"\n== student data wait: Trainer, {STUDENT}, CE, batch {TRAIN_BATCH}, "
                f"{args.train_size} px, {args.steps} steps ({args.images // TRAIN_BATCH} per "
                "epoch), threads 1",
                flush=True,
            )
            for workers in args.train_workers:
                result_train = train_data_wait(
                    train_root,
                    eval_root,
                    workdir / f"run-{workers}",
                    args.train_size,
                    workers,
                    args.steps,
                )
                trains.append(result_train)
                print(
                    f"data.workers {workers}: {result_train.images_per_s:.0f} img/s, "
                    f"data_wait_share {result_train.data_wait_share:.1%} (epoch "
                    f"{result_train.epochs}), epoch 1 {result_train.first_epoch_wait_share:.1%}",
                    flush=True,
                )
    elapsed = time.monotonic() - began
    misses = [
        result
        for result in loaders
        if statistics.median(result.ratios) < 1.0  # target: kdserve >= 1.0x torchvision
    ]
    print("\n== summary (for the README's Benchmarks section)\n")
    print(f"Data pipeline (`bench/data_throughput.py`, {elapsed:.0f} s): {machine}.")
    print(f"Folder: {folder_line}.")
    print(f"Command: `{command}`\n")
    print("\n".join(loader_table(loaders)))
    if trains:
        print()
        print("\n".join(train_table(trains)))
    print()
    if misses:
        print(
            "Target MISSED (kdserve >= 1.0x torchvision) with "
            + ", ".join(f"{result.workers} worker(s)" for result in misses)
            + "."
        )
    else:
        print("Target met: kdserve >= 1.0x torchvision at every worker count.")


if __name__ == "__main__":
    main()
