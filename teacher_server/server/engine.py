"""One replica of one model on one device: rebuild the student's view, run the forward.

Every forward pass the server computes goes through `ModelRunner`, whichever transport
carried its requests and whichever batch they landed in.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator, Sequence
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
    """One replica of one model on one device: rebuilds the student's view, runs the forward.

    With `pass_sizes`, every pass runs padded to the smallest size that holds it (the padding
    rows hold an earlier pass's views or zeros; each row's logits depend on that row alone in
    eval mode, and the padding's are dropped), so the model sees a few fixed shapes: one CUDA
    graph each (`capture_graphs`), one compiled graph each, a bounded oneDNN primitive cache.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        spec: InputSpec,
        device: str,
        *,
        pass_sizes: Sequence[int] = (),
        pinned_upload: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.spec = spec
        self.pass_sizes = tuple(sorted(pass_sizes))
        self._pinned = pinned_upload and self.device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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
        fresh pages for every pass cost more than the preprocessing itself on a CPU. It starts
        zeroed and holds the padding rows of a padded pass after the `size` returned.
        """
        rows = self.padded_size(size)
        if self._batch_buffer is None or self._batch_buffer.shape[0] < rows:
            if self._graphs:
                raise RuntimeError(f"a pass of {size} images is larger than every captured graph")
            height, width = self.spec.input_size
            memory_format = (
                torch.channels_last if self.spec.channels_last else torch.contiguous_format
            )
            self._batch_buffer = torch.empty(
                (rows, 3, height, width), device=self.device, memory_format=memory_format
            ).zero_()
        return self._batch_buffer[:size]

    def padded_size(self, size: int) -> int:
        """The rows a pass of `size` images computes: the smallest pass size that holds it."""
        index = bisect.bisect_left(self.pass_sizes, size)
        return self.pass_sizes[index] if index < len(self.pass_sizes) else size

    def prepare(
        self, images: torch.Tensor, start: int, stop: int, mix: Mix | None, out: torch.Tensor
    ) -> None:
        """Write rows start:stop of a request into `out`, normalized at the model's input size.

        Mixing reads each row's partner from the whole request, so a request split across
        batches is mixed exactly as if it were computed in one piece.
        """
        with self._on_stream():
            rows = self._upload(images[start:stop])
            if mix is None and tuple(rows.shape[-2:]) == self.spec.input_size:
                normalize(rows, self._mean, self._std, out=out)
                return
            views = to_unit_float(rows)
            if mix is not None:
                partner_rows = torch.as_tensor(mix.perm[start:stop], dtype=torch.long)
                partners = self._upload(images.index_select(0, partner_rows))
                views = apply_mix(views, to_unit_float(partners), mix)
            normalize(resize_views(views, self.spec.input_size), self._mean, self._std, out=out)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """Raw logits (temperature 1) as float32 on the CPU, one row per view."""
        size = int(views.shape[0])
        rows = self.padded_size(size)
        with self._on_stream(), torch.inference_mode():
            captured = self._graphs.get(rows)
            if rows != size or captured is not None:
                # The padded pass, or the captured graph, reads the batch buffer.
                batch = self.new_batch(rows)
                if views.data_ptr() != batch.data_ptr():
                    batch[:size].copy_(views)
                views = batch
            if captured is not None:
                graph, logits = captured
                graph.replay()
            else:
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
            return logits[:size].to("cpu", torch.float32)

    def capture_graphs(self) -> None:
        """One CUDA graph per pass size, largest first, sharing one memory pool.

        Each graph reads the batch buffer (which `prepare` fills in place) and writes a static
        logits tensor that `forward` copies out before the next pass; call it after an eager
        warm-up pass at each size (cuDNN picks its algorithms outside the capture).
        """
        if self._stream is None:
            raise RuntimeError("CUDA graphs need a CUDA device")
        buffer = self.new_batch(self.pass_sizes[-1])
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        for rows in reversed(self.pass_sizes):
            graph = torch.cuda.CUDAGraph()
            with (
                torch.cuda.graph(graph, pool=pool, stream=self._stream),
                torch.inference_mode(),
                self._autocast(cache_enabled=False),
            ):
                logits = self.module(buffer[:rows])
            self._graphs[rows] = (graph, logits)

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
        else:
            with torch.cuda.stream(self._stream):
                yield

    def _upload(self, rows: torch.Tensor) -> torch.Tensor:
        """CPU rows on the device. From pinned memory the copy is asynchronous on the replica's
        stream (the host allocator keeps the block until the copy is done), so the next rows
        are staged while these travel."""
        if self._pinned:
            staged = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            rows = staged.copy_(rows)
        return rows.to(self.device, non_blocking=True)

    def _autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager[object]:
        if self._compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(
            self.device.type, dtype=self._compute_dtype, cache_enabled=cache_enabled
        )
