"""Model zoo: small classifiers used as teachers and students in the KD literature.

Every factory takes ``num_classes``, ``in_channels`` and ``input_size`` (square inputs) and
returns a plain ``nn.Module`` mapping ``(B, in_channels, input_size, input_size)`` to logits
``(B, num_classes)``. Intermediate features are read with forward hooks, never returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdkit.errors import KdkitError
from kdkit.models import denoise, gpt, lenet, mlp, plain_cnn, resnet, wrn
from kdkit.models._registry import MODELS
from kdkit.models.sources import (
    SPECIAL_KEYS,
    attach_output,
    create_from_source,
    load_weights,
    split_source,
)

__all__ = ["MODELS", "count_parameters", "create_model", "geometry", "list_models",
           "model_problems"]

# The family modules register themselves on import.
_FAMILIES = (denoise, gpt, lenet, mlp, plain_cnn, resnet, wrn)
# Arguments every factory takes that come from the dataset, never from the user.
DATA_FILLED = ("num_classes", "in_channels", "input_size")


def geometry(input_shape: Any, num_classes: int) -> dict[str, int]:
    """The data-filled model arguments: images (C, H, W) give ``in_channels`` C and
    ``input_size`` H; token sequences (L,) give ``input_size`` L (the context) and one
    channel; ``num_classes`` is the number of classes (a language model's vocabulary)."""
    shape = tuple(input_shape)
    if len(shape) == 1:
        return {"num_classes": num_classes, "in_channels": 1, "input_size": shape[0]}
    return {"num_classes": num_classes, "in_channels": shape[0], "input_size": shape[1]}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name``: a zoo name, or ``torchvision:``/``timm:``/``py:``/``hf:`` sources
    (:mod:`kdkit.models.sources`); ``weights: PATH`` and ``output: KEY`` work with every
    source. Unknown names or arguments raise ``KdkitError``, and so do sizes whose weights
    cannot be allocated (or overflow a tensor's size)."""
    weights, output = kwargs.pop("weights", None), kwargs.pop("output", None)
    source, target = split_source(name)
    if source is not None:
        if source == "hf" and output is not None:
            raise KdkitError(f"model '{name}': hf: models already return their logits; "
                             "remove output")
        geometry = {k: kwargs.pop(k, None) for k in DATA_FILLED}  # None: the source's default
        model = create_from_source(source, target, **geometry, **kwargs)
    else:
        model = _create_zoo(name, **kwargs)
    if output is not None:
        attach_output(model, output, f"model '{name}'")
    if weights is not None:
        load_weights(model, weights, f"model '{name}'")
    return model


def model_problems(name: str, kwargs: dict[str, Any], where: str = "") -> list[str]:
    """What is wrong with model ``name`` and its arguments (empty if nothing), without
    building it: an unknown name or argument, an argument the data sets, a missing
    weights file, an unusable output key."""
    at = f"{where}: " if where else ""
    try:
        source, _target = split_source(name)
    except KdkitError as e:
        return [f"{at}{e}"]
    problems = []
    if source is None:
        if name not in MODELS:
            MODELS.get(name)  # raises, with the closest names
        for k in (k for k in kwargs if k in DATA_FILLED):
            if where.startswith("--"):
                problems.append(f"{where} {k}: set from the dataset (--data); remove it")
            else:
                problems.append(f"{where + '.' if where else ''}{k}: set from the dataset; "
                                "remove it")
        plain = {k: v for k, v in kwargs.items() if k not in DATA_FILLED + SPECIAL_KEYS}
        problems += [f"{at}{p}" for p in MODELS.check_kwargs(name, plain)]
    weights = kwargs.get("weights")
    if weights is not None and not (isinstance(weights, str) and Path(weights).expanduser()
                                    .is_file()):
        problems.append(f"{at}weights: no such file {str(weights)[:200]}")
    output = kwargs.get("output")
    if output is not None and (isinstance(output, bool) or not isinstance(output, (str, int))):
        problems.append(f"{at}output: a key, attribute name or index, got {str(output)[:40]}")
    return problems


def _create_zoo(name: str, **kwargs: Any) -> nn.Module:
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
