"""The model registry (kept apart from ``__init__`` so model files can import it)."""

from __future__ import annotations

from torch import nn

from kdkit.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
