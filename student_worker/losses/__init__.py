"""Distillation losses by name: `build("dkd", alpha=1.0, beta=8.0, temperature=4.0)`.

A loss gives the distillation term alone, batch-mean, from RAW teacher logits (temperature 1;
each loss applies its own). The trainer adds the rest of the objective:
`ce_weight * CE(mixed labels) + ramp * kd_weight * loss(student_logits, teacher_logits, labels)`
with `ramp = min(epoch / warmup_epochs, 1)` (epochs counted from 1; 1 when `warmup_epochs` is
0), the values coming from `defaults(name, image_size)`. Losses compute in at least float32 and
return that dtype, so float16 (AMP) logits cannot overflow inside them.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import pkgutil
from collections.abc import Callable, KeysView, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "LOSSES",
    "SMALL_IMAGE_MAX_SIZE",
    "TRAINER_SETTINGS",
    "LossFn",
    "build",
    "checked_logits",
    "defaults",
    "register",
]

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Setting = float | int | str
LossFunction = TypeVar("LossFunction", bound=Callable[..., Tensor])

SMALL_IMAGE_MAX_SIZE = 64
"""Images up to this many pixels a side get the CIFAR-sized recipe, larger ones ImageNet's."""

TRAINER_SETTINGS = ("ce_weight", "kd_weight", "warmup_epochs", "label_smoothing")
"""Keys of `defaults()` that the trainer uses itself; every other key goes to `build()`."""


@dataclass(frozen=True)
class _Loss:
    function: Callable[..., Tensor]
    required: frozenset[str]
    accepted: frozenset[str]
    positive: frozenset[str]
    non_negative: frozenset[str]
    choices: Mapping[str, tuple[str, ...]]
    small_images: Mapping[str, Setting]
    large_images: Mapping[str, Setting]


_REGISTRY: dict[str, _Loss] = {}
LOSSES: KeysView[str] = _REGISTRY.keys()


def register(
    name: str,
    *,
    small_images: Mapping[str, Setting],
    large_images: Mapping[str, Setting] | None = None,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    choices: Mapping[str, tuple[str, ...]] | None = None,
) -> Callable[[LossFunction], LossFunction]:
    """Register a loss under `name`; every keyword-only parameter is a checked hyper-parameter.

    `small_images` / `large_images` are the recipes for CIFAR-sized / ImageNet-sized images: the
    loss's hyper-parameters plus `TRAINER_SETTINGS`; `large_images` defaults to `small_images`.
    """
    choices = dict(choices or {})

    def decorate(function: LossFunction) -> LossFunction:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        keyword_only = {
            parameter.name: parameter
            for parameter in inspect.signature(function).parameters.values()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }
        declared = [*positive, *non_negative, *choices]
        if sorted(declared) != sorted(keyword_only):
            raise TypeError(
                f"loss {name!r}: declare each hyper-parameter of {function.__name__} "
                f"({', '.join(sorted(keyword_only))}) in exactly one of positive, non_negative, "
                f"choices; got {', '.join(sorted(declared))}"
            )
        loss = _Loss(
            function=function,
            required=frozenset(
                key
                for key, parameter in keyword_only.items()
                if parameter.default is parameter.empty
            ),
            accepted=frozenset(keyword_only),
            positive=frozenset(positive),
            non_negative=frozenset(non_negative),
            choices=choices,
            small_images=dict(small_images),
            large_images=dict(small_images if large_images is None else large_images),
        )
        for recipe in (loss.small_images, loss.large_images):
            expected = loss.accepted | set(TRAINER_SETTINGS)
            if set(recipe) != expected:
                raise TypeError(
                    f"loss {name!r}: a recipe must set exactly {', '.join(sorted(expected))}; "
                    f"got {', '.join(sorted(recipe))}"
                )
            _validated(name, loss, _hyperparameters(recipe))
        _REGISTRY[name] = loss
        return function

    return decorate


def build(name: str, **hyperparameters: object) -> LossFn:
    """The loss `name` with its hyper-parameters bound: `(student, teacher, labels) -> scalar`.

    Raises ValueError for an unknown loss, an unknown or missing hyper-parameter, or a bad value.
    """
    loss = _lookup(name)
    return partial(loss.function, **_validated(name, loss, hyperparameters))


def defaults(name: str, image_size: int) -> dict[str, Setting]:
    """The recommended hyper-parameters and `TRAINER_SETTINGS` of loss `name` at `image_size` px.

    Images up to `SMALL_IMAGE_MAX_SIZE` get the papers' CIFAR recipes, larger ones ImageNet's.
    """
    loss = _lookup(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}")
    recipe = loss.small_images if image_size <= SMALL_IMAGE_MAX_SIZE else loss.large_images
    return dict(recipe)


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


def _lookup(name: str) -> _Loss:
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _hyperparameters(recipe: Mapping[str, Setting]) -> dict[str, Setting]:
    return {key: value for key, value in recipe.items() if key not in TRAINER_SETTINGS}


def _validated(name: str, loss: _Loss, hyperparameters: Mapping[str, object]) -> dict[str, Setting]:
    unknown = sorted(set(hyperparameters) - loss.accepted)
    if unknown:
        key = unknown[0]
        hint = " (a trainer setting, not a loss hyper-parameter)" if key in TRAINER_SETTINGS else ""
        raise ValueError(
            f"unknown hyper-parameter {key}={hyperparameters[key]!r} for loss {name!r}{hint}; "
            f"it accepts {', '.join(sorted(loss.accepted))}"
        )
    missing = sorted(loss.required - set(hyperparameters))
    if missing:
        raise ValueError(
            f"loss {name!r} needs hyper-parameter(s) {', '.join(missing)}; "
            f"defaults({name!r}, image_size) gives the recommended values"
        )
    return {key: _checked_value(name, loss, key, value) for key, value in hyperparameters.items()}


def _checked_value(name: str, loss: _Loss, key: str, value: object) -> Setting:
    if key in loss.choices:
        options = loss.choices[key]
        if not isinstance(value, str) or value not in options:
            raise ValueError(
                f"loss {name!r}: {key}={value!r} is not one of {', '.join(map(repr, options))}"
            )
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ValueError(f"loss {name!r}: {key}={value!r} must be a finite number")
    if key in loss.positive and value <= 0:
        raise ValueError(f"loss {name!r}: {key}={value!r} must be > 0")
    if key in loss.non_negative and value < 0:
        raise ValueError(f"loss {name!r}: {key}={value!r} must be >= 0")
    return float(value)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
