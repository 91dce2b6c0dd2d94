"""What a request gets back: ensembles combined at T = 1, then tempered, in the dtype asked."""

from __future__ import annotations

import torch

from teacher_server.server.outputs import combine_members, finish_outputs


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
