"""Checkpoints and saved artifacts: tensors in safetensors, everything else in JSON.

Two formats, both written atomically and durably (temporary file, fsync, rename, fsync of
the folder; see :mod:`kdkit.files`); nothing is ever unpickled.

- **Training state** (:func:`save_state` / :func:`load_state`), rewritten many times by a
  resumable run: *one* file, ``state.safetensors``, whose header's string metadata holds the
  JSON state (epoch, step, settings, history) and one SHA-256 over the tensors and that
  state. A checkpoint
  is therefore one atomic unit: a kill can never pair new weights with old JSON. The
  previous checkpoint is kept as ``state.prev.safetensors``; if the newest is missing or
  unreadable, resume falls back to it and says so.
- **Artifacts** (:func:`save_checkpoint` / :func:`load_checkpoint`), written once: a
  finished model, record, transfer set or generator as ``<stem>.safetensors`` +
  ``<stem>.json`` (the readable recipe, with the SHA-256 of the tensor file). The JSON is
  written last and marks the artifact complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdkit.errors import CheckpointError
from kdkit.files import atomic_write_bytes, commit_file, sync_file, temp_file

FORMAT = "kdkit-checkpoint-1"
STATE_FORMAT = "kdkit-state-1"
MAX_JSON_BYTES = 64 * 1024**2  # a JSON side file larger than this is not one of ours


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
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no copy
    return h.hexdigest()


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of a dict of tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no copy
    return h.hexdigest()


def _save_tensors(path: Path, tensors: dict[str, Tensor],
                  metadata: dict[str, str] | None = None, *, keep_previous: bool = False) -> None:
    """Write ``tensors`` to ``path`` atomically and durably; with ``keep_previous`` the file
    that was there becomes :func:`prev_path` (a kill between the two renames leaves it)."""
    # safetensors refuses shared storage and non-contiguous views; store plain copies.
    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    tmp = temp_file(path)
    try:
        save_file(plain, str(tmp), metadata=metadata)
        if keep_previous and path.exists():
            sync_file(tmp)
            os.replace(path, prev_path(path))
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file kdkit wrote; anything unreadable is one :class:`CheckpointError`."""
    try:
        if path.is_dir():
            raise CheckpointError(f"{what} {path} is a directory, not a JSON file")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{what} {path} is too large to be a kdkit JSON file")
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} {path} is not valid UTF-8 JSON ({str(e)[:120]}); it is "
                              "corrupt: delete it, or restore it from a copy") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror}") from None


# ------------------------------------------------------------------ training state (1 file)


class NoReadableCheckpoint(CheckpointError):
    """Neither the newest checkpoint nor the one kept before it can be read."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("no readable checkpoint: " + "; ".join(reasons)
                         + ". Start over with --force (or delete the checkpoint folder)")


def unreadable_path(path: Path) -> Path:
    """Where an unreadable newest checkpoint is set aside when resume falls back."""
    return path.with_name(path.stem + ".unreadable" + path.suffix)


def prev_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``state.safetensors`` -> ``state.prev...``."""
    return path.with_name(path.stem + ".prev" + path.suffix)


def _state_digest(tensors: dict[str, Tensor], state: str) -> str:
    """SHA-256 of a checkpoint's tensors and its JSON state text together."""
    return hashlib.sha256(f"{tensors_digest(tensors)}:{state}".encode()).hexdigest()


def save_state(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write one atomic checkpoint file (tensors + JSON state); keep the previous one."""
    state = json.dumps(meta, sort_keys=True)
    metadata = {"format": STATE_FORMAT, "sha256": _state_digest(tensors, state), "state": state}
    _save_tensors(path, tensors, metadata, keep_previous=True)


def read_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify one state file; raise :class:`CheckpointError` saying what is wrong."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({str(e)[:160]})") from None
    if metadata.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a kdkit checkpoint ({STATE_FORMAT} expected)")
    state = metadata.get("state")
    if not isinstance(state, str) or _state_digest(tensors, state) != metadata.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its tensors and state do not match their "
                              "SHA-256")
    try:
        meta = json.loads(state)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path} is corrupt: its state is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt: its state is not a JSON object")
    return tensors, meta


def load_state(
    path: Path, log: Callable[[str], None] | None = print
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest readable checkpoint at ``path`` (or the one kept before it); None if none.

    A newest checkpoint that is missing or unreadable (a crash between the two renames of
    :func:`save_state`, or a damaged disk) falls back to ``state.prev``, saying so. Only
    when neither can be read is it an error.
    """
    candidates = [p for p in (path, prev_path(path)) if p.exists()]
    if not candidates:
        return None
    problems = []
    for p in candidates:
        try:
            out = read_state(p)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            # Set the unreadable newest aside: the next save would otherwise rotate it over
            # this good one, and a kill between that save's two renames would leave nothing.
            os.replace(path, unreadable_path(path))
            if log is not None:
                log(f"kdkit: warning: {problems[0]}; resuming from the previous checkpoint "
                    f"{p.name} (epoch {out[1].get('epoch', '?')}, step {out[1].get('step', '?')})"
                    f"; the unreadable one is kept as {unreadable_path(path).name}")
        elif p != path and log is not None:
            log(f"kdkit: warning: newest checkpoint {path.name} is missing; resuming from the "
                f"previous one {p.name}")
        return out
    raise NoReadableCheckpoint(problems)


# ------------------------------------------------------------- artifacts (.safetensors + .json)


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
    meta = read_json(meta_path, "checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a kdkit checkpoint (format {FORMAT} expected)")
    name, digest_want = meta.get("weights"), meta.get("sha256")
    if not isinstance(name, str) or not isinstance(digest_want, str):
        raise CheckpointError(f"{meta_path} lacks its 'weights' file name or 'sha256'; it is "
                              "corrupt: restore it or retrain")
    if name != stem.with_suffix(".safetensors").name:
        raise CheckpointError(f"{meta_path} names weights '{name[:80]}', but a kdkit file "
                              f"names its own {stem.name}.safetensors beside it; it was edited "
                              "or is corrupt")
    weights = meta_path.parent / name
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {meta_path} names {weights.name}, which is missing")
    digest = sha256_file(weights)
    if digest != digest_want:
        raise CheckpointError(
            f"checkpoint {weights} is corrupt: its SHA-256 does not match {meta_path.name}; "
            "delete it (and resume from an earlier run) or retrain"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    return tensors, meta


def state_mismatch(own: dict[str, Tensor], state: dict[str, Tensor], shapes_label: str,
                   shape_item: Callable[[str, list[int], list[int]], str]) -> list[str]:
    """What keeps ``state`` from loading into a module whose state dict is ``own``: the
    missing, unexpected and misshapen keys (a few of each), as phrases; empty if it fits."""
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [shape_item(k, list(state[k].shape), list(own[k].shape))
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if shapes:
        parts.append(f"{shapes_label} {shapes[:3]}")
    return parts


def load_state_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``; a mismatch names the missing/extra/misshapen keys."""
    own = module.state_dict()
    parts = state_mismatch(own, state, "shape mismatch",
                           lambda k, f, m: f"{k}: checkpoint {f} vs model {m}")
    if parts:
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
