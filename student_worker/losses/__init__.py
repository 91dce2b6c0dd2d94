"""The losses by name, one module each: the single list of loss names (`names()`).

A distillation loss is `def loss(student_logits, teacher_logits, labels, *, params) -> Tensor`
with a pydantic model of its hyper-parameters, registered with `@register(name, Params, ...)`
and its recipes: the hyper-parameters and objective weights (`objective.ObjectiveWeights`)
its papers use on CIFAR-sized and ImageNet-sized images. It gives the distillation term
alone, batch-mean, from RAW teacher logits (temperature 1; each loss applies its own), in at
least float32 so float16 (AMP) logits cannot overflow inside it. `ce`, the baseline, trains
on labels alone and needs no teacher. Adding a loss is one module here plus its test: every
module of this package is imported, and the config, the CLI and the demo read `names()`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from student_worker.objective import Objective, ObjectiveWeights

SMALL_IMAGE_MAX_SIZE = 64
"""Images up to this many pixels a side get the CIFAR-sized recipe, larger ones ImageNet's."""


class Hyperparameters(BaseModel):
    """Base of every loss's hyper-parameters: unknown keys, inf and NaN are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


P = TypeVar("P", bound=Hyperparameters)
P_contra = TypeVar("P_contra", bound=Hyperparameters, contravariant=True)


class LossFunction(Protocol[P_contra]):
    def __call__(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, params: P_contra
    ) -> Tensor: ...


@dataclass(frozen=True)
class Recipe(Generic[P]):
    """What a loss recommends at one image scale: the objective's weights and its parameters."""

    weights: ObjectiveWeights
    params: P


@dataclass(frozen=True)
class LossSpec(Generic[P]):
    """One registered loss: its hyper-parameters' model, its function and its recipes."""

    name: str
    params: type[P]
    function: LossFunction[P] | None
    small_images: Recipe[P]
    large_images: Recipe[P]

    @property
    def needs_teacher(self) -> bool:
        return self.function is not None

    def recipe(self, image_size: int) -> Recipe[P]:
        """The recipe for images of `image_size` pixels a side."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}")
        return self.small_images if image_size <= SMALL_IMAGE_MAX_SIZE else self.large_images

    def objective(
        self,
        image_size: int,
        *,
        hyperparameters: Mapping[str, Any] | None = None,
        weights: Mapping[str, Any] | None = None,
    ) -> Objective:
        """The objective at `image_size`: the recipe, with the given values in its place.

        Raises ValueError naming the loss and the bad key or value.
        """
        recipe = self.recipe(image_size)
        try:
            chosen_weights = ObjectiveWeights.model_validate(
                {**recipe.weights.model_dump(), **(weights or {})}
            )
            params = self.params.model_validate(
                {**recipe.params.model_dump(), **(hyperparameters or {})}
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                for e in exc.errors()
            )
            raise ValueError(f"loss {self.name!r}: {problems}") from None
        if self.function is None:
            return Objective(chosen_weights)
        return Objective(chosen_weights, partial(self.function, params=params))


_REGISTRY: dict[str, LossSpec[Any]] = {}


def register(
    name: str,
    params: type[P],
    *,
    small_images: Recipe[P],
    large_images: Recipe[P] | None = None,
) -> Callable[[LossFunction[P]], LossFunction[P]]:
    """Register a distillation loss under `name`; `large_images` defaults to `small_images`."""

    def decorate(function: LossFunction[P]) -> LossFunction[P]:
        _add(LossSpec(name, params, function, small_images, large_images or small_images))
        return function

    return decorate


def register_baseline(name: str, weights: ObjectiveWeights) -> None:
    """Register a loss that trains on labels alone (no teacher, no distillation term)."""
    recipe = Recipe(weights, Hyperparameters())
    _add(LossSpec(name, Hyperparameters, None, recipe, recipe))


def get(name: str) -> LossSpec[Any]:
    """The loss registered as `name`; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Every registered loss name, the baselines first."""
    return sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].needs_teacher, name))


def checked_logits(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits, checked to be (N, C) of one shape, in one dtype of at least float32."""
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be (N, num_classes) of the same shape; got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    return student_logits.to(dtype), teacher_logits.to(dtype)


def _add(spec: LossSpec[Any]) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"loss {spec.name!r} is already registered")
    for recipe in (spec.small_images, spec.large_images):
        if type(recipe.params) is not spec.params:
            raise TypeError(
                f"loss {spec.name!r}: a recipe's params must be {spec.params.__name__}, "
                f"got {type(recipe.params).__name__}"
            )
    _REGISTRY[spec.name] = spec


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
