"""Finished models on disk: ``model.safetensors`` + ``model.json`` (how to rebuild it).

``model.json`` records the registered model name and arguments and the data geometry and
normalisation it was trained with, so ``kdkit eval`` and teacher loading can rebuild the
module from the registry without unpickling anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdkit.errors import CheckpointError
from kdkit.models import create_model
from kdkit.train.checkpoint import load_checkpoint, load_state_strict, save_checkpoint, signature

MODEL_STEM = "model"


def save_model(
    run_dir: Path,
    model: nn.Module,
    *,
    name: str,
    kwargs: dict[str, Any],
    data: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a registered model's weights and the recipe to rebuild it; returns the .safetensors path."""
    state = model.state_dict()
    stem = run_dir / MODEL_STEM
    save_checkpoint(
        stem,
        dict(state),
        {"kind": "model", "model": {"name": name, "kwargs": kwargs}, "data": data,
         "signature": signature(state), **(extra or {})},
    )
    return stem.with_suffix(".safetensors")


def model_stem(path: str | Path) -> Path:
    """Accept a run directory, a ``model.json`` or a ``model.safetensors``; return the stem."""
    p = Path(path)
    if p.is_dir():
        if (p / f"{MODEL_STEM}.json").exists():
            return p / MODEL_STEM
        raise CheckpointError(
            f"{p} holds no finished model ({MODEL_STEM}.json); is the run complete? "
            "A killed run continues with --resume"
        )
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix("")
    if not p.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {p}")
    raise CheckpointError(f"{p} is not a run directory, model.json or model.safetensors")


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a saved model; return (model in eval mode, its metadata)."""
    stem = model_stem(path)
    tensors, meta = load_checkpoint(stem)
    if meta.get("kind") != "model":
        raise CheckpointError(f"{stem}.json is a training checkpoint, not a finished model")
    spec, data = meta["model"], meta["data"]
    c, h, _w = data["input_shape"]
    model = create_model(
        spec["name"], num_classes=data["num_classes"], in_channels=c, input_size=h, **spec["kwargs"]
    )
    load_state_strict(model, tensors, f"{stem}.safetensors")
    model.eval()
    return model, meta
