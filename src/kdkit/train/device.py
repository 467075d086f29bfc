"""Where and in what precision a run computes: device resolution, autocast, data placement.

Placement is the loop's business, never a method's (docs/DESIGN.md): the loop moves the
distiller (student, adapters, loss buffers and teachers) and each batch to one device and
runs the forward pass under one autocast. Every loss is computed in float32 whatever the
autocast (:meth:`kdkit.distill.term.Term.compute` casts its inputs and turns autocast off).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Share of the device's free memory an in-memory dataset may take to be moved there whole.
DATA_ON_DEVICE_FRACTION = 0.4


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def _distributed_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names, checked to exist: ``auto`` takes a GPU when there is one.

    Under torchrun (``WORLD_SIZE`` > 1) a CUDA device without an index is the rank's own
    GPU, ``cuda:LOCAL_RANK``; naming one index for every rank is refused.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            text = "cuda"
        elif _mps_available():
            text = "mps"
        else:
            return torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise KdkitError(f"device {str(spec)[:40]!r} is not a device; use {DEVICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU build" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise KdkitError(f"device {text!r}: {why}; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if _distributed_world() > 1:
            if dev.index is not None and count > 1:
                raise KdkitError(
                    f"device {text!r} under torchrun: every rank would use the same GPU; give "
                    "--device cuda and each rank takes its own (cuda:LOCAL_RANK)")
            index = _local_rank() if dev.index is None else dev.index
        else:
            index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise KdkitError(f"device cuda:{index}: this machine has {count} CUDA GPU(s) "
                             f"(cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise KdkitError(f"device {text!r}: MPS (Apple GPU) is not available here; use "
                             "--device cpu (or auto)")
        return torch.device("mps")
    raise KdkitError(f"device {text!r} is not supported; use {DEVICES}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def check_precision(name: str, device: torch.device) -> str:
    """``name`` if the device can compute in it; one clear error otherwise."""
    if name not in PRECISIONS:
        raise KdkitError(f"precision {str(name)[:20]!r} is not one of {', '.join(PRECISIONS)}")
    if (_DTYPES.get(name) is torch.bfloat16 and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise KdkitError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                         "support; use fp16 (or fp32)")
    return name


@dataclass
class Precision:
    """Autocast and (for fp16) gradient scaling on one device.

    ``fp32`` computes as is; ``bf16`` and ``fp16`` run the forward passes (student, teachers,
    adapters) under :func:`torch.autocast`; fp16 also scales the loss with a GradScaler,
    whose state is part of the checkpoint (so a resumed fp16 run stays exact).
    """

    name: str
    device: torch.device
    scaler: Any = field(init=False)

    def __post_init__(self) -> None:
        check_precision(self.name, self.device)
        # float16's narrow range needs the loss scaled (bfloat16's does not)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.dtype is torch.float16)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES.get(self.name, torch.float32)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fits_on_device(size: int, device: torch.device) -> bool:
    """Whether ``size`` bytes may move to ``device`` whole (always on the CPU)."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return size <= DATA_ON_DEVICE_FRACTION * free


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; a copy from pinned memory does not wait for the transfer."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=t.is_pinned())


def tree_to(obj: Any, device: torch.device) -> Any:
    """Move every tensor of a nested dict/list/tuple to ``device`` (non-blocking copies)."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: tree_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_to(v, device) for v in obj)
    return obj


def iter_batches(x: Tensor, y: Tensor, batch_size: int, device: torch.device
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) in batches, each moved to ``device``."""
    for i in range(0, len(x), batch_size):
        yield to_device(x[i : i + batch_size], device), to_device(y[i : i + batch_size], device)
