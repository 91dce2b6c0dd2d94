"""ModelRunner on its own: the shapes a padded pass gives the model, and what comes back."""

from __future__ import annotations

import torch

from teacher_server.server.engine import InputSpec, ModelRunner

SPEC = InputSpec((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class RowSums(torch.nn.Module):
    """Logits that depend on each row alone, and a record of every batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(views.shape[0]))
        return torch.stack([views.sum((1, 2, 3)), views.amax((1, 2, 3))], dim=1)


def run(runner: ModelRunner, images: torch.Tensor) -> torch.Tensor:
    batch = runner.new_batch(len(images))
    runner.prepare(images, 0, len(images), None, batch)
    return runner.forward(batch)


def test_passes_pad_to_the_next_size_and_answer_only_their_rows() -> None:
    module = RowSums()
    padded = ModelRunner(module, SPEC, "cpu", pass_sizes=(16, 4))
    plain = ModelRunner(RowSums(), SPEC, "cpu")
    generator = torch.Generator().manual_seed(5)
    for size in (3, 16, 1, 9, 4):
        images = torch.randint(0, 256, (size, 3, 8, 8), dtype=torch.uint8, generator=generator)
        assert torch.equal(run(padded, images), run(plain, images))
    assert module.sizes == [4, 16, 4, 16, 4]
    assert [padded.padded_size(n) for n in (1, 4, 5, 16, 17)] == [4, 4, 16, 16, 17]


def test_a_batch_not_from_new_batch_is_padded_through_the_buffer() -> None:
    module = RowSums()
    runner = ModelRunner(module, SPEC, "cpu", pass_sizes=(8,))
    views = torch.randn(3, 3, 8, 8)
    assert torch.equal(runner.forward(views), RowSums()(views))
    assert module.sizes == [8]
