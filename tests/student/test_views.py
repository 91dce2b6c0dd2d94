"""student_worker.views: crops drawn on the original image, eval views, seeded per sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from student_worker.augment import AugmentSettings, ConsistentViews, batch_views
from student_worker.data import ImageSet, UnreadableImageError, build_datasets, load_image_folder
from student_worker.views import (
    CropSettings,
    StepBatches,
    TrainViews,
    collate_views,
    crop_box,
    eval_view,
    model_noise_seed,
    random_view,
    sample_generator,
)
from teacher_server.shared.tv import import_torchvision

import_torchvision()
from torchvision.transforms.v2 import functional as tv_functional  # noqa: E402


def checkerboard(height: int, width: int, square: int = 2) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    board = (((y // square) + (x // square)) % 2 * 255).to(torch.uint8)
    return board.expand(3, -1, -1).contiguous()


def test_crop_boxes_keep_the_scale_and_ratio_ranges() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_box(rng, 300, 500, (0.08, 1.0), (3 / 4, 4 / 3))
        assert top >= 0 and top + h <= 300 and left >= 0 and left + w <= 500
        assert 0.07 <= h * w / (300 * 500) <= 1.01
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_a_crop_impossible_in_ten_tries_falls_back_to_the_centre_at_the_clamped_ratio() -> None:
    # A 1000 x 10 strip cannot hold a square of any share: torchvision's fallback.
    box = crop_box(np.random.default_rng(0), 10, 1000, (0.5, 1.0), (1.0, 1.0))
    assert box == (0, 495, 10, 10)
    assert crop_box(np.random.default_rng(0), 40, 40, (2.0, 3.0), (1.0, 1.0)) == (0, 0, 40, 40)


def test_the_crop_is_cut_from_the_original_so_detail_survives() -> None:
    """A crop of 1/64 of a 256 px image at a 32 px view is the original pixels, unresized; a
    picture squashed to 32 px first would have averaged the 2 px checkerboard to grey."""
    image = checkerboard(256, 256)
    crop = CropSettings(32, scale=(1 / 64, 1 / 64), ratio=(1.0, 1.0), flip=False)
    view = random_view(image, crop, np.random.default_rng(1))
    assert view.shape == (3, 32, 32) and view.dtype == torch.uint8
    assert set(view.unique().tolist()) == {0, 255}
    squashed = tv_functional.resize(image, [32, 32], antialias=True)
    assert float(squashed.float().std()) < 5.0


def test_eval_view_resizes_the_short_side_and_takes_the_centre() -> None:
    image = torch.arange(3 * 100 * 200, dtype=torch.int64).remainder(251).to(torch.uint8)
    image = image.view(3, 100, 200)
    view = eval_view(image, 32, 0.5)
    expected = tv_functional.center_crop(tv_functional.resize(image, 64, antialias=True), [32, 32])
    assert view.shape == (3, 32, 32) and torch.equal(view, expected)
    square = checkerboard(32, 32)
    assert torch.equal(eval_view(square, 32, 1.0), square)
    squashed = eval_view(image, 16, None)
    assert torch.equal(squashed, tv_functional.resize(image, [16, 16], antialias=True))
    with pytest.raises(ValueError, match="crop_pct must be in"):
        eval_view(image, 32, 1.5)


def jpeg_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(sizes):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def test_views_depend_on_the_step_and_position_alone_not_on_the_workers(tmp_path: Path) -> None:
    sizes = [(60 + 7 * i, 90 - 5 * i) for i in range(8)]
    images = load_image_folder(jpeg_folder(tmp_path, sizes), image_size=24)
    crop = CropSettings(24, scale=(0.08, 1.0))
    batches = [[3, 1, 4, 0], [5, 2, 7, 6]]

    def cut(workers: int, independent: bool) -> list[torch.Tensor]:
        sampler = StepBatches()
        sampler.set(10, batches)
        views = TrainViews(images, crop, seed=7, rank=1, independent=independent)
        loader = DataLoader(
            views,  # type: ignore[arg-type]
            batch_sampler=sampler,
            collate_fn=collate_views,
            num_workers=workers,
        )
        cut_batches = list(loader)
        assert [b.sample_ids.tolist() for b in cut_batches] == batches
        return [
            torch.cat([b.views, b.teacher_views]) if independent else b.views for b in cut_batches
        ]

    inline, in_workers = cut(0, True), cut(2, True)
    assert all(torch.equal(a, b) for a, b in zip(inline, in_workers, strict=True))
    student, teacher = inline[0][:4], inline[0][4:]
    assert not torch.equal(student, teacher), "independent: the teacher's crop is its own"
    assert torch.equal(cut(0, False)[0], student), "the student's views do not depend on it"
    image = images[batches[1][2]][0]
    expected = random_view(image, crop, sample_generator(7, 1, 11, 2))
    assert torch.equal(inline[1][2], expected)


def test_consistent_views_are_the_views_the_trainer_cuts() -> None:
    train_set, _, _ = build_datasets("digits", image_size=16)
    images = torch.stack([train_set[i][0] for i in range(6)])
    labels = train_set.labels[:6]
    settings = AugmentSettings(view_size=16, mixup_alpha=0.4)
    whole = ConsistentViews(settings, seed=3, rank=0, step=9)(images, labels)
    sampler = StepBatches()
    sampler.set(9, [list(range(6))])
    loader = DataLoader(
        TrainViews(train_set, settings.crop_settings, seed=3, rank=0),  # type: ignore[arg-type]
        batch_sampler=sampler,
        collate_fn=collate_views,
    )
    batch = next(iter(loader))
    cut = batch_views(settings, batch.views, batch.labels, seed=3, rank=0, step=9)
    assert torch.equal(cut.view, whole.view) and cut.mix == whole.mix and cut.mix is not None


def test_a_corrupt_image_file_is_named(tmp_path: Path) -> None:
    jpeg_folder(tmp_path, [(20, 20), (20, 20)])
    (tmp_path / "a" / "1.jpg").write_bytes(b"not a jpeg at all")
    images = load_image_folder(tmp_path, image_size=16)
    assert images[1][0].shape == (3, 20, 20)  # b/0.jpg
    with pytest.raises(UnreadableImageError, match=r"cannot decode image .*a/1\.jpg"):
        images[0]


def test_an_image_set_keeps_any_size_and_cuts_square_views() -> None:
    originals = [checkerboard(48, 48), checkerboard(40, 64, square=4)]
    image_set = ImageSet(originals, torch.tensor([0, 1]), class_names=["x", "y"], image_size=16)
    for index, original in enumerate(originals):
        kept, label, sample_id = image_set[index]
        assert torch.equal(kept, original), "stored as given: not squashed to image_size"
        assert (label, sample_id) == (index, index)
    crop = CropSettings(16, scale=(1.0, 1.0), ratio=(1.6, 1.6), flip=False)
    # The whole 40 x 64 image, resized once to 16 x 16: its 4 px squares become 1.6 x 1 px.
    view = random_view(originals[1], crop, sample_generator(0, 0, 0, 1))
    assert view.shape == (3, 16, 16)
    expected = tv_functional.resize(originals[1], [16, 16], antialias=True)
    assert torch.equal(view, expected)


def test_a_padded_crop_is_cifars_random_crop_with_padding() -> None:
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    crop = CropSettings(32, mode="padded", padding=4, flip=False)
    shifts = set()
    for seed in range(40):
        view = random_view(image, crop, np.random.default_rng(seed))
        assert view.shape == (3, 32, 32)
        rows = (view[0] == 0).all(1)
        cols = (view[0] == 0).all(0)
        # Zeros fill at most 4 px on each side; the rest is the image, unresized.
        assert int(rows.sum()) <= 4 and int(cols.sum()) <= 4
        assert set(view.unique().tolist()) <= {0, 200}
        shifts.add((int(rows.sum()), int(cols.sum())))
    assert len(shifts) > 5


def test_drop_path_noise_is_seeded_per_rank_and_step() -> None:
    """DeiT seeds each rank apart (seed + rank): the ranks of one DDP run must not draw the
    same drop-path masks, and a step's masks must not depend on what ran before it."""
    seeds = {model_noise_seed(0, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200
    assert model_noise_seed(0, 1, 7) == model_noise_seed(0, 1, 7) != model_noise_seed(1, 1, 7)
    masks = []
    for rank in (0, 1):
        torch.manual_seed(model_noise_seed(0, rank, 3))
        masks.append(torch.rand(1000) < 0.1)
    assert not torch.equal(masks[0], masks[1])
