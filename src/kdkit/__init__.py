"""kdkit: knowledge distillation for PyTorch, on unmodified models.

The Python API in one import::

    from kdkit import create_model, load_dataset, Distiller, build_method, fit, LoopSettings
"""

from kdkit.data import load_dataset
from kdkit.data.loader import BatchLoader
from kdkit.distill import Distiller, Term, build_method
from kdkit.errors import KdkitError
from kdkit.models import create_model, list_models
from kdkit.taps import LOGITS, Tap, capture, run_with_taps
from kdkit.train.artifacts import load_model, save_model
from kdkit.train.loop import LoopSettings, fit
from kdkit.train.metrics import evaluate

__version__ = "0.1.0"

__all__ = [
    "LOGITS",
    "BatchLoader",
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
