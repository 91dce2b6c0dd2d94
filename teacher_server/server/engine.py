"""One replica of one model on one device: rebuild the student's view, run the forward.

Every forward pass the server computes goes through `ModelRunner`, whichever transport
carried its requests and whichever batch they landed in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from teacher_server.shared.contract import Mix
from teacher_server.shared.views import apply_mix, normalize, resize_views, to_unit_float

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
