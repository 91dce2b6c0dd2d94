"""Cross-entropy on labels alone: the baseline a distilled student is measured against."""

from __future__ import annotations

from student_worker.losses import register_baseline
from student_worker.objective import ObjectiveWeights

register_baseline(
    "ce", ObjectiveWeights(ce_weight=1.0, kd_weight=0.0, warmup_epochs=0, label_smoothing=0.0)
)
