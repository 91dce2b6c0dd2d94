"""Pure parts: wire tensors, request validation, mixing, ensemble combination, temperature."""

from __future__ import annotations

import math

import pytest
import torch

from teacher_server.codec import parse_request, tensor_from_wire, tensor_to_wire
from teacher_server.engine import combine_members, finish_outputs
from teacher_server.errors import InvalidRequest
from teacher_server.views import (
    Mix,
    apply_mix,
    mix_views,
    normalize,
    resize_views,
    to_unit_float,
)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.int32]
)
def test_tensor_round_trip_is_exact(dtype: torch.dtype) -> None:
    tensor = (torch.rand(2, 3, 5, 4) * 100).to(dtype)
    wire = tensor_to_wire(tensor)
    assert len(wire["data"]) == tensor.numel() * tensor.element_size()
    back = tensor_from_wire(
        wire,
        "t",
        {
            "uint8": torch.uint8,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float32": torch.float32,
            "int32": torch.int32,
        },
    )
    assert back.dtype == dtype and torch.equal(back, tensor)


def test_wire_bytes_are_little_endian_c_order() -> None:
    wire = tensor_to_wire(torch.tensor([[1.0, 2.0]], dtype=torch.float32).t())
    assert wire["shape"] == [2, 1]
    assert wire["data"] == b"\x00\x00\x80\x3f\x00\x00\x00\x40"


def test_uint8_view_wire_size_is_the_pixels() -> None:
    images = torch.zeros(16, 3, 224, 224, dtype=torch.uint8)
    assert len(tensor_to_wire(images)["data"]) == 16 * 3 * 224 * 224


def test_parse_request_defaults_and_path_model() -> None:
    fields = {"images": tensor_to_wire(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))}
    request = parse_request(fields, path_model="t")
    assert (request.model, request.temperature, request.output, request.output_dtype) == (
        "t",
        1.0,
        "logits",
        "float32",
    )
    assert request.top_k is None and request.mix is None and request.request_id == ""


def test_cutmix_label_weight_is_kept_area() -> None:
    fields = {
        "model": "t",
        "images": tensor_to_wire(torch.zeros(2, 3, 10, 20, dtype=torch.uint8)),
        "mix": {"mode": "cutmix", "perm": [1, 0], "box": [0, 0, 5, 10]},
    }
    mix = parse_request(fields).mix
    assert mix is not None and mix.box == (0, 0, 5, 10)
    assert mix.lam == pytest.approx(1 - 50 / 200)


@pytest.mark.parametrize("temperature", [0, -2, math.inf, "2", True])
def test_bad_temperatures(temperature: object) -> None:
    fields = {
        "model": "t",
        "images": tensor_to_wire(torch.zeros(1, 3, 4, 4, dtype=torch.uint8)),
        "temperature": temperature,
    }
    with pytest.raises(InvalidRequest, match="temperature"):
        parse_request(fields)


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


def test_combine_members_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[3.0, 0.0, -1.0]])
    assert torch.allclose(combine_members([a, b], [1.0, 3.0], "mean_logits"), (a + 3 * b) / 4)
    expected = torch.log(0.25 * a.softmax(-1) + 0.75 * b.softmax(-1))
    assert torch.allclose(combine_members([a, b], [1.0, 3.0], "mean_probs"), expected, atol=1e-6)
    assert torch.allclose(combine_members([a], [2.0], "mean_probs"), a.log_softmax(-1))


def test_finish_outputs_temperature_has_one_owner() -> None:
    raw = torch.randn(4, 7) * 5
    for temperature in (0.5, 1.0, 3.0):
        out = finish_outputs(
            raw, temperature=temperature, output="logits", output_dtype="float32", top_k=None
        )
        assert out.full is not None and torch.equal(out.full, raw / temperature)
    probs = finish_outputs(
        raw, temperature=2.0, output="probs", output_dtype="float16", top_k=None
    ).full
    assert probs is not None and probs.dtype == torch.float16
    assert torch.allclose(probs.float(), (raw / 2).softmax(-1), atol=1e-3)
    top = finish_outputs(raw, temperature=1.0, output="log_probs", output_dtype="float32", top_k=2)
    assert top.full is None and top.top_k_indices is not None and top.top_k_values is not None
    assert torch.equal(top.top_k_indices.long(), raw.topk(2, dim=-1).indices)
    assert torch.allclose(top.top_k_values, raw.log_softmax(-1).topk(2, dim=-1).values)
