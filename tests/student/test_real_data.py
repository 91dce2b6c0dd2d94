"""A student on an ImageFolder of JPEGs of many sizes: views cut in worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from student_worker.config import available_cores, load_run_config
from student_worker.runlog import RunLog
from student_worker.trainer import Trainer

pytestmark = pytest.mark.slow


def photo_folder(root: Path, count: int, seed: int) -> Path:
    """JPEGs of assorted sizes in two classes, smooth like photographs plus some noise."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        y, x = np.mgrid[0:height, 0:width]
        label = index % 2
        base = np.stack([x * (3 + 3 * label), y * 4, (x + y) * 2], axis=-1) % 256
        pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        folder = root / ("stripes" if label else "ramps")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


def test_workers_change_nothing_and_eval_views_are_centre_crops(tmp_path: Path) -> None:
    train = photo_folder(tmp_path / "train", 48, seed=0)
    val = photo_folder(tmp_path / "val", 12, seed=1)

    def run(workers: int) -> list[float]:
        out = tmp_path / f"workers-{workers}"
        config = load_run_config(
            None,
            {
                "data.name": "imagefolder",
                "data.root": str(train),
                "data.eval_root": str(val),
                "data.image_size": 24,
                "data.workers": workers,
                "augment.crop_scale": [0.08, 1.0],
                "loss.name": "ce",
                "batch_size": 8,
                "epochs": 2,
                "threads": 1,
                "output_dir": str(out),
            },
        )
        trainer = Trainer(config)
        assert config.data.eval_crop_pct == 0.875
        unset = load_run_config(None, {"data.name": "imagefolder", "loss.name": "ce"})
        assert unset.data.loader_workers == max(1, min(4, available_cores() - 1))
        assert load_run_config(None, {"loss.name": "ce"}).data.loader_workers == 0
        metrics = trainer.fit()
        assert metrics["samples"] == 12
        records = RunLog(out).records("train")
        assert len(records) == 12 and all(0 <= r["data_wait_share"] <= 1 for r in records)
        return [r["loss"] for r in records]

    assert run(0) == run(2)
