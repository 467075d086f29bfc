"""Checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is two files: ``<stem>.safetensors`` (model, adapters, optimiser buffers)
and ``<stem>.json`` (epoch, step, hyperparameters, the SHA-256 of the tensor file and
the model's signature). Each file is written to a temporary name and renamed, and the
JSON is written last, so a crash leaves either the old or the new checkpoint, never a
torn one. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdkit.errors import CheckpointError

FORMAT = "kdkit-checkpoint-1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def signature(state: dict[str, Tensor]) -> dict[str, list[int]]:
    """Names and shapes of a state dict: what a model must have to load it."""
    return {k: list(v.shape) for k, v in sorted(state.items())}


def module_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's class and state (every parameter and buffer, names and bytes)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    # safetensors refuses shared storage and non-contiguous views; store plain copies.
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(plain, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(stem: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Save ``tensors`` to ``stem.safetensors`` and ``meta`` (+ hash, format) to ``stem.json``."""
    weights = stem.with_suffix(".safetensors")
    _save_tensors(weights, tensors)
    meta = dict(meta, format=FORMAT, weights=weights.name, sha256=sha256_file(weights))
    atomic_write_json(stem.with_suffix(".json"), meta)


def load_checkpoint(stem: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load and verify a checkpoint; refuse a missing, torn or tampered one clearly."""
    meta_path = stem.with_suffix(".json")
    if not meta_path.exists():
        raise CheckpointError(f"no checkpoint at {meta_path} (expected {stem.name}.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {meta_path} is not valid JSON ({e}); it is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a kdkit checkpoint (format {FORMAT} expected)")
    weights = meta_path.parent / meta["weights"]
    if not weights.exists():
        raise CheckpointError(f"checkpoint {meta_path} names {weights.name}, which is missing")
    digest = sha256_file(weights)
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint {weights} is corrupt: its SHA-256 does not match {meta_path.name}; "
            "delete it (and resume from an earlier run) or retrain"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    return tensors, meta


def load_state_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``; a mismatch names the missing/extra/misshapen keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise CheckpointError(
            f"checkpoint {source} does not match the model ({'; '.join(parts)}); "
            "was it saved for a different architecture or number of classes?"
        )
    module.load_state_dict(state)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser's state into tensors (for safetensors) and JSON-able data."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"optim/{pid}/{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = val
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
