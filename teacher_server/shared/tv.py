"""The one place that imports torchvision.

A CPU-only torch beside a torchvision wheel built for CUDA cannot load torchvision's compiled
ops, and `import torchvision` then fails while registering fake kernels for them. Only in that
case, placeholder schemas for those ops are defined first; models and transforms work without
them (detection ops such as nms then raise when called).
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_PLACEHOLDER_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_placeholder_library: torch.library.Library | None = None


def import_torchvision() -> ModuleType:
    """`import torchvision`, defining placeholder op schemas only where its ops failed to load."""
    global _placeholder_library
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _placeholder_library = torch.library.Library("torchvision", "DEF")  # type: ignore[no-untyped-call]
        for schema in _PLACEHOLDER_OPS:
            _placeholder_library.define(schema)  # type: ignore[no-untyped-call]
        import torchvision
    module: ModuleType = torchvision
    return module


def ops_loaded() -> bool:
    """Whether torchvision's compiled ops are real (False when the placeholders stand in)."""
    import_torchvision()
    return _placeholder_library is None
