"""The inference math: one replica's preprocess + forward, ensemble combination, temperature.

Every answer the server gives goes through these functions, whichever transport carried it
and whichever batch it landed in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from teacher_server.codec import Output, OutputDtype
from teacher_server.views import Mix, apply_mix, normalize, resize_views, to_unit_float

Combine = Literal["mean_logits", "mean_probs"]
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: its resolution, normalization and compute dtype."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dtype: str = "float32"
    channels_last: bool = False


class ModelRunner:
    """One replica of one model on one device: rebuilds the student's view, runs the forward."""

    def __init__(self, module: torch.nn.Module, spec: InputSpec, device: str) -> None:
        self.device = torch.device(device)
        self.spec = spec
        module = module.to(self.device)
        if spec.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.module = module
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)
        self._compute_dtype = TORCH_DTYPES[spec.dtype]
        self._batch_buffer: torch.Tensor | None = None
        self._stream = (
            torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            if self.device.type == "cuda"
            else None
        )

    def new_batch(self, size: int) -> torch.Tensor:
        """An input batch on the device, in the model's memory format, to fill with `prepare`.

        The memory is reused from pass to pass (a replica computes one pass at a time):
        fresh pages for every pass cost more than the preprocessing itself on a CPU.
        """
        if self._batch_buffer is None or self._batch_buffer.shape[0] < size:
            height, width = self.spec.input_size
            memory_format = (
                torch.channels_last if self.spec.channels_last else torch.contiguous_format
            )
            self._batch_buffer = torch.empty(
                (size, 3, height, width), device=self.device, memory_format=memory_format
            )
        return self._batch_buffer[:size]

    def prepare(
        self, images: torch.Tensor, start: int, stop: int, mix: Mix | None, out: torch.Tensor
    ) -> None:
        """Write rows start:stop of a request into `out`, normalized at the model's input size.

        Mixing reads each row's partner from the whole request, so a request split across
        batches is mixed exactly as if it were computed in one piece.
        """
        with self._on_stream():
            rows = images[start:stop].to(self.device, non_blocking=True)
            if mix is None and tuple(rows.shape[-2:]) == self.spec.input_size:
                normalize(rows, self._mean, self._std, out=out)
                return
            views = to_unit_float(rows)
            if mix is not None:
                partner_rows = torch.as_tensor(mix.perm[start:stop], dtype=torch.long)
                partners = images.index_select(0, partner_rows).to(self.device, non_blocking=True)
                views = apply_mix(views, to_unit_float(partners), mix)
            normalize(resize_views(views, self.spec.input_size), self._mean, self._std, out=out)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """Raw logits (temperature 1) as float32 on the CPU, one row per view."""
        with self._on_stream(), torch.inference_mode():
            with self._autocast():
                logits = self.module(views)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                got = (
                    list(logits.shape)
                    if isinstance(logits, torch.Tensor)
                    else type(logits).__name__
                )
                raise TypeError(f"model must return (N, num_classes) logits, got {got}")
            if logits.shape[0] != views.shape[0]:
                raise TypeError(
                    f"model returned {logits.shape[0]} rows of logits for {views.shape[0]} images"
                )
            # On the replica's stream: the copy waits for this forward, not the default stream.
            return logits.to("cpu", torch.float32)

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
        else:
            with torch.cuda.stream(self._stream):
                yield

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._compute_dtype)


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
    """Divide by the temperature, then turn into logits, probs or log-probs (top-k if asked)."""
    scaled = raw_logits / temperature if temperature != 1.0 else raw_logits
    if output == "probs":
        values = torch.softmax(scaled, dim=-1)
    elif output == "log_probs":
        values = torch.log_softmax(scaled, dim=-1)
    else:
        values = scaled
    dtype = TORCH_DTYPES[output_dtype]
    if top_k is None:
        return Outputs(values.to(dtype), None, None)
    top_values, top_indices = values.topk(top_k, dim=-1)
    return Outputs(None, top_values.to(dtype), top_indices.to(torch.int32))
