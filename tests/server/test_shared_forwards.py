"""One forward for identical views in flight, through real servers, clients and student runs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from student_worker.config import load_run_config
from student_worker.runlog import RunLog
from student_worker.trainer import Trainer
from teacher_server.client import TeacherClient
from teacher_server.server.serve import ServerThread
from tests.helpers import TOKEN, model_stats, occupy_slow_model, running_server, teacher_config

STEPS = 12
BATCH = 32


def test_identical_requests_queued_together_are_computed_once(strict_server: ServerThread) -> None:
    """Four clients (both transports) send one view while the model is busy: one forward
    answers all four, each with the answer the view gets alone."""
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    urls = [strict_server.endpoints.http_url, strict_server.endpoints.grpc_url] * 2
    clients = [TeacherClient.connect(url, token=TOKEN, model="slow") for url in urls]
    answers: list[torch.Tensor] = []
    try:
        for client in clients:
            client.list_models()  # connected before the model is made busy
        before = model_stats(strict_server)["slow"]
        busy = occupy_slow_model(strict_server, 96)
        askers = [
            threading.Thread(target=lambda c=client: answers.append(c.infer(images)))
            for client in clients
        ]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        busy.join()
    finally:
        for client in clients:
            client.close()
    after = model_stats(strict_server)["slow"]
    with TeacherClient.connect(urls[0], token=TOKEN, model="slow") as client:
        alone = client.infer(images)
    assert len(answers) == 4 and all(torch.equal(answer, alone) for answer in answers)
    assert after["shared_images"] - before["shared_images"] == 12
    assert after["executed_images"] - before["executed_images"] == 96 + 4


def sweep(teachers: dict[str, Any], out: Path, students: int, *, share: bool) -> dict[str, Any]:
    """`students` runs of one seed on one teacher at once; the teacher's stats of the model."""
    config = teacher_config(
        teachers, max_batch_size=BATCH, share_forwards=share, threads_per_replica=1
    )
    with running_server(config) as server:
        trainers = [
            Trainer(
                load_run_config(
                    None,
                    {
                        "teacher.endpoints": [server.endpoints.grpc_url],
                        "teacher.model": "wide",
                        "batch_size": BATCH,
                        "max_steps": STEPS,
                        "output_dir": str(out / f"student-{index}"),
                        "threads": 1,
                    },
                )
            )
            for index in range(students)
        ]
        runs = [threading.Thread(target=trainer.fit) for trainer in trainers]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
        return model_stats(server)["wide"]  # type: ignore[no-any-return]


def train_losses(out: Path) -> list[float]:
    return [record["loss"] for record in RunLog(out).records("train")]


@pytest.mark.slow
def test_a_sweep_of_four_same_seed_students_costs_the_forwards_of_one(
    teachers: dict[str, Any], tmp_path: Path
) -> None:
    one = sweep(teachers, tmp_path / "unshared", 1, share=False)
    four = sweep(teachers, tmp_path / "shared", 4, share=True)
    assert four["images"] == 4 * one["images"]
    assert four["shared_images"] >= 3 * one["images"] * 0.7
    assert four["executed_images"] <= 1.3 * one["executed_images"], (four, one)
    alone = train_losses(tmp_path / "unshared" / "student-0")
    assert len(alone) == STEPS
    for index in range(4):
        assert train_losses(tmp_path / "shared" / f"student-{index}") == alone
