"""Datasets as uint8 images: every sample is `(image (3, H, W) uint8, label, sample_id)`.

Pixels stay uint8 until the augmenter and the teacher server turn them into floats, so the view
sent to the teacher is the one the student trains on. A sample's id is its index in its set and
travels with it through samplers and batches; `-1` is the label of an unlabeled sample.
Images are kept as stored (files are decoded at their full size) and `image_size` is the
student's input: training and evaluation views are cut from the original (`views`).
Nothing here downloads: CIFAR and ImageFolder trees must already be on disk, and the default
data set, scikit-learn's `digits`, ships inside scikit-learn.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from teacher_server.shared.tv import import_torchvision

import_torchvision()
from torchvision import datasets  # noqa: E402
from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: E402

DatasetName = Literal["digits", "cifar10", "cifar100", "imagefolder"]
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
UNLABELED = -1
DIGITS_IMAGE_SIZE = 32
IMAGEFOLDER_IMAGE_SIZE = 224
IMAGEFOLDER_CROP_PCT = 0.875

Sample = tuple[torch.Tensor, int, int]
Int64Array = np.ndarray[Any, np.dtype[np.int64]]


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where the configuration says."""


class ImageSource(Protocol):
    """Indexable uint8 images (3, H, W): an in-memory tensor (N, 3, H, W) is one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...


class ImageFiles:
    """Image files decoded on access with PIL, RGB at their full size (crops are cut later).

    The tensor is (3, H, W) over the decoded (H, W, 3) pixels, channels-last in memory, the
    layout torch's uint8 resize is fastest on.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                rgb = np.array(image.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError) as exc:
            raise UnreadableImageError(f"cannot decode image {path}: {exc}") from exc
        return torch.from_numpy(rgb).permute(2, 0, 1)

    def digest(self) -> str:
        """What identifies these files cheaply: their paths and sizes, in order."""
        sha = hashlib.sha256()
        for path in self.paths:
            sha.update(f"{path}\0{path.stat().st_size}\0".encode())
        return sha.hexdigest()


class UnreadableImageError(OSError):
    """An image file exists but cannot be decoded; the message names it."""


def image_digest(images: ImageSource) -> str:
    """A SHA-256 that changes when the images do: the pixels of in-memory images, the paths
    and sizes of files (what a cache of answers per sample id is checked against)."""
    if isinstance(images, torch.Tensor):
        return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
    if isinstance(images, ImageFiles):
        return images.digest()
    if isinstance(images, ConcatImages):
        parts = "".join(image_digest(source) for source in images.sources)
        return hashlib.sha256(parts.encode()).hexdigest()
    raise TypeError(f"no digest for images of type {type(images).__name__}")


class ConcatImages:
    """Several image sources read as one, in order."""

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        self.sources = list(sources)
        self.ends = list(np.cumsum([len(source) for source in self.sources]).tolist())

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int) -> torch.Tensor:
        part = bisect.bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        return self.sources[part][index - start]


class ImageSet(Dataset[Sample]):
    """uint8 images with int64 labels (`-1`: unlabeled); item i is `(image, label, i)`."""

    def __init__(
        self,
        images: ImageSource,
        labels: torch.Tensor,
        *,
        class_names: Sequence[str],
        image_size: int,
    ) -> None:
        if labels.dtype != torch.int64 or labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(
                f"labels must be int64 of shape ({len(images)},), "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if len(labels) and int(labels.min()) < UNLABELED:
            raise ValueError(f"label {int(labels.min())} is below {UNLABELED} (unlabeled)")
        if len(labels) and int(labels.max()) >= len(class_names):
            raise ValueError(
                f"label {int(labels.max())} out of range for {len(class_names)} classes"
            )
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.image_size = image_size

    @property
    def num_classes(self) -> int:
        """Number of classes (labeled or not, every set of a run shares them)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} images")
        return self.images[index], int(self.labels[index]), index

    def labeled_indices(self) -> torch.Tensor:
        """Indices (sample ids) of the labeled samples: what a CE-only student trains on."""
        return torch.nonzero(self.labels != UNLABELED).flatten()

    def with_labels(self, labels: torch.Tensor) -> ImageSet:
        """The same images with other labels (e.g. most of them hidden)."""
        return ImageSet(
            self.images, labels, class_names=self.class_names, image_size=self.image_size
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What a run needs to know about its data, e.g. to check the student's num_classes."""

    name: str
    num_classes: int
    class_names: list[str]
    image_size: int
    num_train: int
    num_labeled: int
    num_unlabeled_extra: int
    num_eval: int


def collate_uint8(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader collate: images (B, 3, H, W) uint8, labels (B,) int64, sample ids (B,) int64."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    images = torch.stack([image for image, _, _ in samples])
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    labels = torch.tensor([label for _, label, _ in samples], dtype=torch.int64)
    sample_ids = torch.tensor([sample_id for _, _, sample_id in samples], dtype=torch.int64)
    return images, labels, sample_ids


def concat_image_sets(first: ImageSet, *others: ImageSet) -> ImageSet:
    """One set after another; sample ids become indices in the result, so they stay unique."""
    sets = (first, *others)
    for other in others:
        if (other.class_names, other.image_size) != (first.class_names, first.image_size):
            raise ValueError(
                f"cannot concatenate sets with {other.num_classes} classes at "
                f"{other.image_size} px and {first.num_classes} classes at {first.image_size} px"
            )
    return ImageSet(
        ConcatImages([image_set.images for image_set in sets]),
        torch.cat([image_set.labels for image_set in sets]),
        class_names=first.class_names,
        image_size=first.image_size,
    )


def keep_labeled_fraction(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Keep round(fraction * n) of the n labels, hide the rest (-1); the same seed, the same subset.

    Stratified: each class keeps a share proportional to its size (largest remainder), and at
    least one image per class whenever the kept total reaches the number of classes.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"labeled_fraction must be in [0, 1], got {fraction}")
    labeled = torch.nonzero(labels != UNLABELED).flatten().numpy()
    classes, counts = np.unique(labels.numpy()[labeled], return_counts=True)
    quotas = _class_quotas(counts, round(fraction * len(labeled)))
    rng = np.random.default_rng(seed)
    kept = [
        rng.permutation(labeled[labels.numpy()[labeled] == label])[:quota]
        for label, quota in zip(classes.tolist(), quotas.tolist(), strict=True)
    ]
    result = torch.full_like(labels, UNLABELED)
    keep = torch.from_numpy(np.concatenate([np.zeros(0, dtype=np.int64), *kept]))
    result[keep] = labels[keep]
    return result


def _class_quotas(counts: Int64Array, total: int) -> Int64Array:
    """Per-class counts summing to `total`, proportional to `counts` (largest remainder)."""
    quotas: Int64Array = np.minimum(counts, 1 if total >= len(counts) else 0)
    spare: Int64Array = counts - quotas
    extra = total - int(quotas.sum())
    if extra == 0:
        return quotas
    base, remainders = np.divmod(extra * spare, int(spare.sum()))
    quotas = np.asarray(quotas + base, dtype=np.int64)
    shortfall = total - int(quotas.sum())
    quotas[np.argsort(-remainders, kind="stable")[:shortfall]] += 1
    return quotas


def load_digits(
    *, image_size: int = DIGITS_IMAGE_SIZE, eval_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 8x8 digits as RGB uint8, bilinearly upsampled to `image_size`.

    Grey levels 0..16 are scaled to 0..255 and repeated on three channels. The train / eval
    split is stratified and seeded, so the eval images are the same for every run with a seed.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    digits = sklearn_load_digits()
    grey = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1) * 255 / 16
    images = _resize_float(grey, _check_size(image_size)).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    train_part, eval_part = train_test_split(
        np.arange(len(labels)), test_size=eval_fraction, stratify=labels.numpy(), random_state=seed
    )
    names = [str(label) for label in range(10)]

    def subset(part: Any) -> ImageSet:
        index = torch.from_numpy(np.sort(np.asarray(part, dtype=np.int64)))
        return ImageSet(images[index], labels[index], class_names=names, image_size=image_size)

    return subset(train_part), subset(eval_part)


def load_cifar(
    root: str | Path, *, num_classes: Literal[10, 100] = 10, image_size: int = 32
) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 or CIFAR-100 (fine labels) from torchvision's python-pickle files under `root`.

    Images stay at their 32 px; `image_size` is the student's input, cut from them per view.

    The files are checked for presence, not for the MD5s of the official archive, so any copy
    in that format loads; a damaged file still fails when it is unpickled.
    """
    cifar_class = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
    root = Path(root)
    folder = root / cifar_class.base_folder
    files = [name for name, _ in cifar_class.train_list + cifar_class.test_list]
    missing = [
        name for name in [*files, cifar_class.meta["filename"]] if not (folder / name).is_file()
    ]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-{num_classes} not found under {root}: expected {folder} with "
            f"{', '.join(missing)} (download it yourself; kdserve never downloads)"
        )
    unchecked_class = type(
        cifar_class.__name__,
        (cifar_class,),
        {
            "train_list": [[name, None] for name, _ in cifar_class.train_list],
            "test_list": [[name, None] for name, _ in cifar_class.test_list],
            "meta": {**cifar_class.meta, "md5": None},
        },
    )

    _check_size(image_size)

    def split(train: bool) -> ImageSet:
        loaded = unchecked_class(root=str(root), train=train, download=False)
        pixels = torch.from_numpy(np.asarray(loaded.data, dtype=np.uint8)).permute(0, 3, 1, 2)
        return ImageSet(
            pixels.contiguous(),
            torch.tensor(list(loaded.targets), dtype=torch.int64),
            class_names=[str(name) for name in loaded.classes],
            image_size=image_size,
        )

    return split(train=True), split(train=False)


def load_image_folder(root: str | Path, *, image_size: int = IMAGEFOLDER_IMAGE_SIZE) -> ImageSet:
    """A torchvision ImageFolder tree (`root/<class>/<image>`), classes in sorted folder order."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"ImageFolder not found: {root} is not a directory")
    folder = datasets.ImageFolder(str(root))
    samples: list[tuple[str, int]] = [(str(path), int(label)) for path, label in folder.samples]
    _check_size(image_size)
    return ImageSet(
        ImageFiles([Path(path) for path, _ in samples]),
        torch.tensor([label for _, label in samples], dtype=torch.int64),
        class_names=[str(name) for name in folder.classes],
        image_size=image_size,
    )


def load_unlabeled_folder(
    root: str | Path, *, image_size: int, class_names: Sequence[str]
) -> ImageSet:
    """Every image under `root`, at any depth, all unlabeled: a flat folder or an ImageFolder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"unlabeled image folder not found: {root} is not a directory")
    paths = sorted(
        path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS
    )
    if not paths:
        raise DatasetNotFoundError(
            f"no images under {root} (looked for {', '.join(IMG_EXTENSIONS)})"
        )
    _check_size(image_size)
    return ImageSet(
        ImageFiles(paths),
        torch.full((len(paths),), UNLABELED, dtype=torch.int64),
        class_names=class_names,
        image_size=image_size,
    )


def build_datasets(
    name: str = "digits",
    *,
    root: str | Path | None = None,
    eval_root: str | Path | None = None,
    image_size: int | None = None,
    labeled_fraction: float = 1.0,
    seed: int = 0,
    eval_fraction: float = 0.2,
    unlabeled_root: str | Path | None = None,
) -> tuple[ImageSet, ImageSet, DatasetInfo]:
    """The train (distillation) set and the held-out eval set of a run, and what they hold.

    `labeled_fraction` hides labels on the train split only; the images under `unlabeled_root`
    are appended to it, unlabeled. `eval_fraction` applies to digits, whose only split is ours;
    `eval_root` is the evaluation tree of an ImageFolder. `image_size` None: the set's own.
    """
    train_set, eval_set = _load_splits(name, root, eval_root, image_size, seed, eval_fraction)
    train_set = train_set.with_labels(
        keep_labeled_fraction(train_set.labels, labeled_fraction, seed)
    )
    num_labeled = len(train_set.labeled_indices())
    num_extra = 0
    if unlabeled_root is not None:
        extra = load_unlabeled_folder(
            unlabeled_root, image_size=train_set.image_size, class_names=train_set.class_names
        )
        num_extra = len(extra)
        train_set = concat_image_sets(train_set, extra)
    info = DatasetInfo(
        name=name,
        num_classes=train_set.num_classes,
        class_names=train_set.class_names,
        image_size=train_set.image_size,
        num_train=len(train_set),
        num_labeled=num_labeled,
        num_unlabeled_extra=num_extra,
        num_eval=len(eval_set),
    )
    return train_set, eval_set, info


def _load_splits(
    name: str,
    root: str | Path | None,
    eval_root: str | Path | None,
    image_size: int | None,
    seed: int,
    eval_fraction: float,
) -> tuple[ImageSet, ImageSet]:
    """Dispatch by data set name to the loader of its train and eval splits."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}")
    if name != "imagefolder" and eval_root is not None:
        raise ValueError(f"eval_root is only for imagefolder, not {name!r} (got {eval_root})")
    if name == "digits":
        if root is not None:
            raise ValueError(f"digits is embedded in scikit-learn and takes no root (got {root})")
        size = DIGITS_IMAGE_SIZE if image_size is None else image_size
        return load_digits(image_size=size, eval_fraction=eval_fraction, seed=seed)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root directory")
    if name == "imagefolder":
        if eval_root is None:
            raise ValueError(
                "imagefolder needs eval_root, the held-out ImageFolder tree for evaluation"
            )
        size = IMAGEFOLDER_IMAGE_SIZE if image_size is None else image_size
        train_set = load_image_folder(root, image_size=size)
        eval_set = load_image_folder(eval_root, image_size=size)
        if eval_set.class_names != train_set.class_names:
            raise ValueError(
                f"class folders differ: {root} has {train_set.class_names}, "
                f"{eval_root} has {eval_set.class_names}"
            )
        return train_set, eval_set
    return load_cifar(
        root,
        num_classes=10 if name == "cifar10" else 100,
        image_size=32 if image_size is None else image_size,
    )


def _check_size(image_size: int) -> int:
    """`image_size`, once it is known to be a valid side length."""
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    return image_size


def _resize_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (N, C, h, w) in 0..255 -> uint8 (N, C, size, size), bilinear."""
    if images.shape[-2:] != (size, size):
        shrink = size < max(images.shape[-2:])
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
        )
    return images.round().clamp(0, 255).to(torch.uint8)
