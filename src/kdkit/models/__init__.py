"""Model zoo: small classifiers used as teachers and students in the KD literature.

Every factory takes ``num_classes``, ``in_channels`` and ``input_size`` (square inputs) and
returns a plain ``nn.Module`` mapping ``(B, in_channels, input_size, input_size)`` to logits
``(B, num_classes)``. Intermediate features are read with forward hooks, never returned.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdkit.errors import KdkitError
from kdkit.models import lenet, mlp, plain_cnn, resnet, wrn
from kdkit.models._registry import MODELS

__all__ = ["MODELS", "count_parameters", "create_model", "list_models"]

# The family modules register themselves on import.
_FAMILIES = (lenet, mlp, plain_cnn, resnet, wrn)
# Arguments every factory takes that come from the dataset, never from the user.
DATA_FILLED = ("num_classes", "in_channels", "input_size")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; unknown names or arguments raise ``KdkitError``,
    and so do sizes whose weights cannot be allocated (or overflow a tensor's size)."""
    try:
        return MODELS.create(name, **kwargs)
    except (MemoryError, RuntimeError, TypeError) as e:
        text = str(e)
        if not isinstance(e, MemoryError) and not any(
                w in text for w in ("allocate memory", "Overflow when unpacking",
                                    "size calculation overflowed")):
            raise
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        why = text.splitlines()[0][-120:] if text else type(e).__name__
        raise KdkitError(f"model '{name}' is too large to build ({args[:200]}): its weights "
                         f"cannot be allocated ({why}); use smaller sizes") from None


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return MODELS.names()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
