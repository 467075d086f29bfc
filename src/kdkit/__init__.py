"""kdkit: knowledge distillation for PyTorch, on unmodified models.

The Python API in one import::

    from kdkit import create_model, load_dataset, Distiller, build_method, fit, LoopSettings
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdkit.data import load_dataset
    from kdkit.data.loader import BatchLoader
    from kdkit.data.stream import DatasetLoader
    from kdkit.distill import Distiller, Term, build_method
    from kdkit.errors import KdkitError
    from kdkit.models import create_model, list_models
    from kdkit.taps import LOGITS, Tap, capture, run_with_taps
    from kdkit.train.artifacts import load_model, save_model
    from kdkit.train.loop import LoopSettings, fit
    from kdkit.train.metrics import evaluate

# The public API, imported on first use: `import kdkit.cli` must not import torch, so that
# the command line can set its OpenMP thread policy before torch's OpenMP runtime starts.
_API = {
    "load_dataset": "kdkit.data", "BatchLoader": "kdkit.data.loader",
    "DatasetLoader": "kdkit.data.stream",
    "Distiller": "kdkit.distill", "Term": "kdkit.distill", "build_method": "kdkit.distill",
    "KdkitError": "kdkit.errors", "create_model": "kdkit.models", "list_models": "kdkit.models",
    "LOGITS": "kdkit.taps", "Tap": "kdkit.taps", "capture": "kdkit.taps",
    "run_with_taps": "kdkit.taps", "load_model": "kdkit.train.artifacts",
    "save_model": "kdkit.train.artifacts", "LoopSettings": "kdkit.train.loop",
    "fit": "kdkit.train.loop", "evaluate": "kdkit.train.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdkit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__version__ = "0.1.0"

__all__ = [
    "LOGITS",
    "BatchLoader",
    "DatasetLoader",
    "Distiller",
    "KdkitError",
    "LoopSettings",
    "Tap",
    "Term",
    "build_method",
    "capture",
    "create_model",
    "evaluate",
    "fit",
    "list_models",
    "load_dataset",
    "load_model",
    "run_with_taps",
    "save_model",
]
