"""Finished models on disk: ``model.safetensors`` + ``model.json`` (how to rebuild it).

``model.json`` records the registered model name and arguments and the data geometry and
normalisation it was trained with, so ``kdkit eval`` and teacher loading can rebuild the
module from the registry without unpickling anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kdkit.errors import CheckpointError, KdkitError
from kdkit.models import create_model, geometry
from kdkit.models.meta import on_device
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


def _model_recipe(meta: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta["model"]`` and ``meta["data"]``, checked to be what :func:`save_model` writes."""
    spec, data = meta.get("model"), meta.get("data")
    problems = []
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        problems.append("'model' must be a mapping with a 'name'")
    elif not isinstance(spec.get("kwargs", {}), dict):
        problems.append("'model.kwargs' must be a mapping of argument names to values")
    if not isinstance(data, dict):
        problems.append("'data' must be a mapping")
    else:
        if not isinstance(data.get("name"), str):
            problems.append(f"'data.name' must be a dataset name, got {str(data.get('name'))[:40]}")
        shape = data.get("input_shape")
        if not (isinstance(shape, list) and len(shape) in (1, 3)
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            problems.append(f"'data.input_shape' must be [C, H, W] (an image) or [L] (a token "
                            f"context), positive whole numbers, got {str(shape)[:40]}")
        n = data.get("num_classes")
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
            problems.append(f"'data.num_classes' must be a positive whole number, got "
                            f"{str(n)[:40]}")
        for key in ("mean", "std"):
            v = data.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                problems.append(f"'data.{key}' must be a number, got {str(v)[:40]}")
        if isinstance(data.get("std"), (int, float)) and not data["std"] > 0:
            problems.append("'data.std' must be > 0")
    if problems:
        raise CheckpointError(f"{where} is not a valid kdkit model file: {'; '.join(problems)}; "
                              "it was edited or is corrupt (restore it, or retrain)")
    assert isinstance(spec, dict) and isinstance(data, dict)
    return {"name": spec["name"], "kwargs": spec.get("kwargs", {})}, data


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a saved model; return (model in eval mode, its metadata)."""
    stem = model_stem(path)
    tensors, meta = load_checkpoint(stem)
    if meta.get("kind") != "model":
        raise CheckpointError(f"{stem}.json is not a finished model (kind 'model' expected)")
    spec, data = _model_recipe(meta, f"{stem}.json")
    # The shapes first, on the meta device (no memory): a model.json edited to name a
    # model far larger than its weights is refused before anything is allocated.
    skeleton = _rebuild(spec, data, stem, "meta")
    if skeleton is not None and signature(skeleton.state_dict()) != signature(tensors):
        load_state_strict(skeleton, tensors, f"{stem}.safetensors")  # raises, naming keys
    model = _rebuild(spec, data, stem, "cpu")
    assert model is not None
    load_state_strict(model, tensors, f"{stem}.safetensors")
    model.eval()
    return model, meta


def _rebuild(spec: dict[str, Any], data: dict[str, Any], stem: Path, device: str
             ) -> nn.Module | None:
    """The model ``spec`` names, for ``data``'s geometry, on ``device`` ("meta": shapes
    only; None when a model cannot be built there but may be on the CPU)."""
    # the weights are the saved ones: a weights file the model started from is not read
    kwargs = {**geometry(data["input_shape"], data["num_classes"]),
              **{k: v for k, v in spec["kwargs"].items() if k != "weights"}}
    try:
        if device == "meta":
            with on_device("meta"):  # meta without the init fills
                return create_model(spec["name"], **kwargs)
        return create_model(spec["name"], **kwargs)
    except KdkitError as e:
        raise CheckpointError(f"{stem}.json: cannot rebuild its model: {e}") from None
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        if device == "meta":
            return None  # the CPU build below reports a real problem
        raise CheckpointError(f"{stem}.json: cannot rebuild its model "
                              f"({type(e).__name__}: {str(e)[:200]}); was it edited?") from None
