"""Shared by the data-free stages: replacing a saved artifact safely, and progress reports.

- :func:`replace_artifact` writes a ``stem.safetensors`` + ``stem.json`` artifact (see
  :func:`kdkit.train.checkpoint.save_checkpoint`) that may already exist with other
  contents. Its JSON, which marks an artifact complete, is removed first: a kill while
  the new one is written leaves an *incomplete* artifact (no JSON: readers treat it as
  absent and make it again), never new weights beside old JSON.
- :class:`StageProgress` is a tqdm bar on a terminal; when stderr is not a terminal (a log
  file, CI, a batch job) it writes no ``\\r`` updates, only a plain line every
  :data:`PLAIN_EVERY_S` seconds, so a stage shorter than that prints nothing.
- :class:`LossWatch` notices a loss that became NaN/inf without reading the device at
  every step of an optimisation loop.

Devices: the data-free stages compute where the teacher is (its first parameter's device,
:func:`kdkit.train.device.module_device`): latents, inputs being optimised, targets,
dropout filters and statistics are made there. Random draws come from CPU generators and
are then moved, so a seed gives the same draws on every device. What is saved goes to the
CPU first (:func:`replace_artifact` and :func:`cpu_tensors`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdkit.files import fsync_dir
from kdkit.progress import StageProgress, stderr_line  # noqa: F401 (re-exported)
from kdkit.train.checkpoint import save_checkpoint

# Optimisation steps (per batch; generator steps for dafl) and Adam learning rates of each
# transfer source, as the papers set them.
DEFAULT_STEPS = {"record": 1000, "deepinversion": 2000, "dafl": 1500}
DEFAULT_LR = {"record": 0.07, "deepinversion": 0.05, "dafl": 0.2}


def cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` detached and on the CPU (what is saved or turned into numpy)."""
    return {k: v.detach().cpu() for k, v in tensors.items()}


def draw_to(t: Tensor, device: torch.device) -> Tensor:
    """``t``, drawn on the CPU, on ``device``. To a CUDA GPU the copy goes through pinned
    memory and does not wait (a plain copy from pageable memory waits for the GPU's queue
    to drain: a host sync in every step of a training loop)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def replace_artifact(stem: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """:func:`save_checkpoint` of ``tensors`` (moved to the CPU), safe when ``stem`` already
    holds an artifact (see above)."""
    tensors = cpu_tensors(tensors)
    marker = stem.with_suffix(".json")
    if marker.exists():
        marker.unlink()
        fsync_dir(marker.parent)
    save_checkpoint(stem, tensors, meta)


class LossWatch:
    """The loss of each step of an optimisation loop, watched for NaN/inf.

    On the CPU each value is read at once (:meth:`see` returns the bad step at once, as a
    check after every step would). On an accelerator reading a value waits for the device,
    so the first non-finite step and its value are kept *on the device* and read only at
    check points (:meth:`first_bad`: log points, before a checkpoint, at the end); the
    step it names is still the first bad one. ``eager`` overrides the choice.
    """

    def __init__(self, device: torch.device, eager: bool | None = None) -> None:
        self.eager = device.type == "cpu" if eager is None else eager
        self._last: Tensor | float = float("nan")
        if not self.eager:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
            self._bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def see(self, loss: Tensor, step: int) -> tuple[int, float] | None:
        """Note ``step``'s loss; on the CPU, (step, value) if it is not finite, else None."""
        if self.eager:
            value = float(loss.detach())
            self._last = value
            return None if math.isfinite(value) else (step, value)
        v = loss.detach().float()
        self._last = v
        fresh = ~torch.isfinite(v) & (self._bad_step < 0)
        self._bad_step = torch.where(fresh, step, self._bad_step)
        self._bad_value = torch.where(fresh, v, self._bad_value)
        return None

    def first_bad(self) -> tuple[int, float] | None:
        """(step, value) of the first non-finite loss seen, or None (reads the device)."""
        if self.eager:
            return None  # :meth:`see` has reported it
        step = int(self._bad_step)
        return None if step < 0 else (step, float(self._bad_value))

    def last(self) -> float:
        """The last loss seen (reads the device)."""
        return float(self._last)


