"""student_worker.data: uint8 samples with ids, splits, hidden labels, CIFAR and folder loaders."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from student_worker.data import (
    DatasetNotFoundError,
    ImageSet,
    build_datasets,
    collate_uint8,
    concat_image_sets,
    keep_labeled_fraction,
    load_cifar,
    load_digits,
    load_image_folder,
    load_unlabeled_folder,
)
from student_worker.views import EvalViews


def test_digits_are_uint8_rgb_with_ten_classes() -> None:
    train_set, eval_set = load_digits(image_size=32, seed=0)
    image, label, sample_id = train_set[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert int(image.max()) > 200 and int(image.min()) == 0
    assert 0 <= label < 10 and sample_id == 5
    assert train_set.num_classes == eval_set.num_classes == 10
    assert train_set.image_size == 32
    assert (len(train_set), len(eval_set)) == (1437, 360)
    assert set(eval_set.labels.tolist()) == set(range(10))


def test_digits_split_partitions_every_image_once() -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    train_set, eval_set = load_digits(image_size=8, seed=0)
    split_pixels = torch.cat([train_set.images, eval_set.images])  # type: ignore[list-item]
    expected = np.round(sklearn_digits().images * 255 / 16).astype(np.uint8)
    assert sorted(map(bytes, split_pixels[:, 0].numpy())) == sorted(map(bytes, expected))


def test_digits_split_is_seeded() -> None:
    train_a, eval_a = load_digits(image_size=8, seed=1)
    train_b, eval_b = load_digits(image_size=8, seed=1)
    _, eval_c = load_digits(image_size=8, seed=2)
    assert torch.equal(eval_a.images, eval_b.images)  # type: ignore[arg-type]
    assert torch.equal(train_a.labels, train_b.labels)
    assert not torch.equal(eval_a.images, eval_c.images)  # type: ignore[arg-type]


def test_labeled_fraction_counts_coverage_and_seed() -> None:
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 40, 30, 20, 10, 5, 5, 5, 5, 2]))
    kept = keep_labeled_fraction(labels, 0.1, seed=3)
    assert int((kept >= 0).sum()) == round(0.1 * len(labels))
    assert set(kept[kept >= 0].tolist()) == set(range(10))
    assert torch.equal(kept[kept >= 0], labels[kept >= 0])
    assert torch.equal(kept, keep_labeled_fraction(labels, 0.1, seed=3))
    assert not torch.equal(kept, keep_labeled_fraction(labels, 0.1, seed=4))
    per_class = torch.bincount(kept[kept >= 0], minlength=10)
    assert per_class[0] > per_class[9]


def test_labeled_fraction_edges() -> None:
    labels = torch.tensor([0, 0, 1, 1, -1, 2, 2, 2])
    assert torch.equal(keep_labeled_fraction(labels, 1.0, seed=0), labels)
    assert bool((keep_labeled_fraction(labels, 0.0, seed=0) == -1).all())
    few = keep_labeled_fraction(labels, 2 / 7, seed=0)
    assert int((few >= 0).sum()) == 2 and int(few[4]) == -1
    with pytest.raises(ValueError, match=r"1\.5"):
        keep_labeled_fraction(labels, 1.5, seed=0)


def test_build_datasets_digits_with_fraction() -> None:
    train_set, eval_set, info = build_datasets("digits", labeled_fraction=0.1, seed=0)
    assert info.num_labeled == len(train_set.labeled_indices()) == round(0.1 * 1437)
    assert set(train_set.labels[train_set.labeled_indices()].tolist()) == set(range(10))
    assert bool((eval_set.labels >= 0).all())
    assert (info.num_train, info.num_eval, info.num_classes) == (1437, 360, 10)


def test_build_datasets_rejects_bad_names_and_roots(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'mnist'"):
        build_datasets("mnist")
    with pytest.raises(ValueError, match="needs a root"):
        build_datasets("cifar10")
    with pytest.raises(ValueError, match="eval_root"):
        build_datasets("imagefolder", root=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        build_datasets("digits", image_size=0)


def _write_cifar(root: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """Tiny CIFAR files in the official python-pickle layout; returns the test images/labels."""
    rng = np.random.default_rng(num_classes)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        names = ["train", "test"]
        meta_name, meta = "meta", {"fine_label_names": [f"f{i}" for i in range(100)]}
    folder.mkdir(parents=True)
    for name in names:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=3).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, label_key: labels}))
    (folder / meta_name).write_bytes(pickle.dumps(meta))
    return data, labels


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_loads_local_files(tmp_path: Path, num_classes: int) -> None:
    test_data, test_labels = _write_cifar(tmp_path, num_classes)
    train_set, eval_set = load_cifar(tmp_path, num_classes=num_classes)  # type: ignore[arg-type]
    assert (len(train_set), len(eval_set)) == ((15, 3) if num_classes == 10 else (3, 3))
    assert train_set.num_classes == num_classes and train_set.image_size == 32
    image, label, sample_id = eval_set[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image, torch.from_numpy(test_data[2].reshape(3, 32, 32)))
    assert (label, sample_id) == (test_labels[2], 2)


def test_cifar_keeps_its_32_px_for_any_student_size(tmp_path: Path) -> None:
    _write_cifar(tmp_path, 10)
    train_set, _, info = build_datasets("cifar10", root=tmp_path, image_size=16)
    assert train_set[0][0].shape == (3, 32, 32) and info.class_names[0] == "c0"
    assert train_set.image_size == info.image_size == 16


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_names_the_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path))) as error:
        build_datasets(name, root=tmp_path)
    assert "never downloads" in str(error.value)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    assert folder in str(error.value)


def _write_pngs(folder: Path, count: int, size: tuple[int, int], start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.full((size[1], size[0], 3), (start + i) * 20, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


def test_image_folder_train_eval_and_errors(tmp_path: Path) -> None:
    for split in ("train", "val"):
        _write_pngs(tmp_path / split / "cat", 2, (20, 10))
        _write_pngs(tmp_path / split / "dog", 3, (7, 9), start=5)
    train_set, eval_set, info = build_datasets(
        "imagefolder", root=tmp_path / "train", eval_root=tmp_path / "val", image_size=12
    )
    assert info.class_names == ["cat", "dog"] and (len(train_set), len(eval_set)) == (5, 5)
    assert train_set.image_size == 12
    image, label, sample_id = train_set[3]
    # Decoded at full size (a 7 x 9 PNG): views are cut from the original later.
    assert image.dtype == torch.uint8 and image.shape == (3, 9, 7)
    assert (label, sample_id) == (1, 3) and int(image[0, 0, 0]) == 6 * 20
    assert train_set[0][0].shape == (3, 10, 20)
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_image_folder(tmp_path / "nowhere", image_size=12)
    _write_pngs(tmp_path / "other" / "bird", 1, (4, 4))
    with pytest.raises(ValueError, match="class folders differ"):
        build_datasets("imagefolder", root=tmp_path / "train", eval_root=tmp_path / "other")


def test_unlabeled_folder_flat_or_tree(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "flat", 3, (5, 5))
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8), mode="L").save(tmp_path / "flat" / "g.png")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    flat = load_unlabeled_folder(tmp_path / "flat", image_size=8, class_names=["a", "b"])
    assert len(flat) == 4 and bool((flat.labels == -1).all())
    assert flat[3][0].shape == (3, 5, 5) and flat[3][1] == -1
    assert flat[0][0].shape == (3, 4, 4)  # g.png, grey, decoded as RGB
    _write_pngs(tmp_path / "tree" / "x", 2, (5, 5))
    _write_pngs(tmp_path / "tree" / "y", 2, (5, 5))
    tree = load_unlabeled_folder(tmp_path / "tree", image_size=8, class_names=["a"])
    assert len(tree) == 4 and bool((tree.labels == -1).all())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="empty"):
        load_unlabeled_folder(tmp_path / "empty", image_size=8, class_names=["a"])


def test_build_with_unlabeled_extra_has_unique_ids(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "extra", 6, (10, 10))
    train_set, _, info = build_datasets(
        "digits", image_size=16, labeled_fraction=0.5, unlabeled_root=tmp_path / "extra"
    )
    assert info.num_unlabeled_extra == 6 and len(train_set) == 1437 + 6 == info.num_train
    assert info.num_labeled == len(train_set.labeled_indices()) == round(0.5 * 1437)
    tail = [train_set[i] for i in range(len(train_set) - 7, len(train_set))]
    assert [label for _, label, _ in tail[1:]] == [-1] * 6
    assert tail[0][0].shape == (3, 16, 16)
    assert all(image.shape == (3, 10, 10) for image, _, _ in tail[1:])
    views = EvalViews(train_set, 16, 1.0)
    loader = DataLoader(views, batch_size=256, shuffle=True, collate_fn=collate_uint8)
    ids = torch.cat([sample_ids for _, _, sample_ids in loader])
    assert sorted(ids.tolist()) == list(range(len(train_set)))


def test_collate_uint8() -> None:
    train_set, _ = load_digits(image_size=8, seed=0)
    images, labels, sample_ids = collate_uint8([train_set[4], train_set[9]])
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8)
    assert labels.dtype == sample_ids.dtype == torch.int64
    assert sample_ids.tolist() == [4, 9] and labels.tolist() == train_set.labels[[4, 9]].tolist()
    with pytest.raises(ValueError, match="empty"):
        collate_uint8([])


def test_concat_rejects_mismatched_sets() -> None:
    small = ImageSet(
        torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        torch.tensor([0, -1]),
        class_names=["a"],
        image_size=8,
    )
    large = ImageSet(
        torch.zeros(1, 3, 9, 9, dtype=torch.uint8),
        torch.tensor([-1]),
        class_names=["a"],
        image_size=9,
    )
    with pytest.raises(ValueError, match="9 px"):
        concat_image_sets(small, large)
    with pytest.raises(ValueError, match="label 1 out of range"):
        ImageSet(
            torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
            torch.tensor([1]),
            class_names=["a"],
            image_size=8,
        )
    with pytest.raises(IndexError, match="index 2"):
        small[2]
