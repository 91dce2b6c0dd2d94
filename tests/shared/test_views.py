"""The pixel arithmetic both sides share: mixing, unit floats, resizing, normalizing."""

from __future__ import annotations

import pytest
import torch

from teacher_server.shared.contract import Mix
from teacher_server.shared.views import apply_mix, mix_views, normalize, resize_views, to_unit_float


def test_mixup_and_cutmix_by_hand() -> None:
    x = torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 1.0)])
    mixed = mix_views(x, Mix("mixup", (1, 0), lam=0.25))
    assert torch.allclose(mixed[0], torch.full((3, 4, 4), 0.25 * 0.2 + 0.75 * 1.0))
    assert torch.allclose(mixed[1], torch.full((3, 4, 4), 0.25 * 1.0 + 0.75 * 0.2))
    cut = mix_views(x, Mix.cutmix((1, 0), (1, 1, 3, 4), 4, 4))
    assert (
        cut[0, :, 1:3, 1:4].eq(1.0).all()
        and cut[0, :, 0].eq(0.2).all()
        and cut[0, :, :, 0].eq(0.2).all()
    )
    assert Mix.cutmix((1, 0), (1, 1, 3, 4), 4, 4).lam == pytest.approx(1 - 6 / 16)
    assert torch.equal(x, torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 1.0)]))


def test_apply_mix_on_rows_equals_mixing_the_whole_request() -> None:
    x = torch.rand(6, 3, 8, 8)
    mix = Mix("mixup", (5, 4, 3, 2, 1, 0), lam=0.6)
    whole = mix_views(x, mix)
    rows = apply_mix(x[2:4], x[[mix.perm[2], mix.perm[3]]], mix)
    assert torch.equal(rows, whole[2:4])


def test_unit_float_resize_normalize() -> None:
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    unit = to_unit_float(pixels)
    assert torch.allclose(unit[0, :, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    assert resize_views(unit, (2, 2)) is unit
    assert resize_views(unit, (5, 7)).shape == (1, 3, 5, 7)
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.25, 0.5])
    expected = torch.tensor([-1.0, -1.2, 1.0])
    assert torch.allclose(normalize(unit, mean, std)[0, :, 0, 0], expected)
    assert torch.allclose(normalize(pixels, mean, std)[0, :, 0, 0], expected)
    batch = torch.full((3, 3, 2, 2), 7.0)
    normalize(pixels, mean, std, out=batch[1:2])
    assert (
        torch.allclose(batch[1, :, 0, 0], expected)
        and batch[0].eq(7.0).all()
        and batch[2].eq(7.0).all()
    )
    assert torch.equal(unit, to_unit_float(pixels)), "normalize must not change its input"
