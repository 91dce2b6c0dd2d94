"""What a request gets back from raw logits: an ensemble's members combined, then tempered.

The one owner of temperature on the server: `served(T) == served(1) / T`, an ensemble being
combined at T = 1 first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from teacher_server.shared.contract import TENSOR_DTYPES, Output, OutputDtype
from teacher_server.shared.errors import InvalidRequest, ModelFailure

Combine = Literal["mean_logits", "mean_probs"]


def combine_members(
    member_logits: Sequence[torch.Tensor], weights: Sequence[float], combine: Combine
) -> torch.Tensor:
    """An ensemble's logits at temperature 1 from its members' raw logits.

    mean_logits: weighted mean of logits. mean_probs: log of the weighted mean of softmax.
    """
    share = torch.tensor(weights, dtype=torch.float32) / float(sum(weights))
    stacked = torch.stack(list(member_logits))
    if combine == "mean_logits":
        return torch.einsum("m,mnc->nc", share, stacked)
    log_probs = torch.log_softmax(stacked, dim=-1) + torch.log(share).view(-1, 1, 1)
    return torch.logsumexp(log_probs, dim=0)


@dataclass(frozen=True)
class Outputs:
    """What a request asked to get back, computed from raw logits."""

    full: torch.Tensor | None
    top_k_values: torch.Tensor | None
    top_k_indices: torch.Tensor | None


def finish_outputs(
    raw_logits: torch.Tensor,
    *,
    temperature: float,
    output: Output,
    output_dtype: OutputDtype,
    top_k: int | None,
) -> Outputs:
    """Divide by the temperature, then turn into logits, probs or log-probs (top-k if asked).

    Every answer is finite: non-finite raw logits are the model's failure; outputs that do
    not fit `output_dtype` at this temperature are the request's (InvalidRequest).
    """
    if not bool(torch.isfinite(raw_logits).all()):
        raise ModelFailure("the model produced non-finite logits (inf or NaN) for this request")
    scaled = raw_logits / temperature if temperature != 1.0 else raw_logits
    if output == "probs":
        values = torch.softmax(scaled, dim=-1)
    elif output == "log_probs":
        values = torch.log_softmax(scaled, dim=-1)
    else:
        values = scaled
    dtype = TENSOR_DTYPES[output_dtype]
    if top_k is None:
        return Outputs(_finite(values, dtype, temperature, output), None, None)
    top_values, top_indices = values.topk(top_k, dim=-1)
    return Outputs(
        None, _finite(top_values, dtype, temperature, output), top_indices.to(torch.int32)
    )


def _finite(
    values: torch.Tensor, dtype: torch.dtype, temperature: float, output: Output
) -> torch.Tensor:
    """`values` in `dtype`, or InvalidRequest when some do not fit it."""
    cast = values.to(dtype)
    if bool(torch.isfinite(cast).all()):
        return cast
    largest = float(values.abs().max())
    raise InvalidRequest(
        f"{output} at temperature {temperature:g} reach magnitude {largest:.3g}, beyond "
        f"{str(dtype).removeprefix('torch.')} (max {torch.finfo(dtype).max:.3g}); ask a higher "
        "temperature or output_dtype float32"
    )
