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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from kdkit.files import fsync_dir
from kdkit.progress import progress_bar
from kdkit.train.checkpoint import save_checkpoint

PLAIN_EVERY_S = 60.0  # seconds between two plain progress lines when stderr is no terminal
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


def stderr_line(message: str) -> None:
    """Print one line to stderr (where progress and warnings go), at once."""
    print(message, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StageProgress:
    """Progress of a long stage of ``total`` units: a bar on a terminal, plain lines elsewhere.

    Args:
        desc: the stage's name, e.g. ``"dafl generator"``.
        enabled: False: report nothing (``--no-progress``).
        initial: units already done (a resumed stage).
        log: where plain lines go (default: stderr).
        every_s: seconds between plain lines (default :data:`PLAIN_EVERY_S`).
    """

    def __init__(self, desc: str, total: int, *, enabled: bool = True, initial: int = 0,
                 unit: str = "step", log: Callable[[str], None] | None = None,
                 every_s: float | None = None) -> None:
        self.bar = progress_bar(total=total, initial=initial, desc=desc, disable=not enabled,
                                leave=False, dynamic_ncols=True, mininterval=0.5, unit=unit)
        self.plain = enabled and bool(self.bar.disable)  # wanted, but stderr is no terminal
        self.desc, self.total, self.unit = desc, total, unit
        self.n = self.first = initial
        self.every_s = PLAIN_EVERY_S if every_s is None else every_s
        self.log = log or stderr_line
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.lines = 0
        self.printed = -1  # units done at the last plain line

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.plain:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if not self.plain:
            self.bar.set_postfix(values, refresh=False)

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        done = self.n - self.first
        units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
        text = (f"{self.desc}: {self.n}/{self.total} {units} "
                f"({100.0 * self.n / max(1, self.total):.0f}%), {_duration(elapsed)}")
        if 0 < done and self.n < self.total:
            text += f", about {_duration(elapsed / done * (self.total - self.n))} left"
        if self.postfix:
            text += f"; {self.postfix}"
        self.log(text)
        self.last, self.printed = now, self.n
        self.lines += 1

    def close(self, finished: bool = True) -> None:
        """Close the bar; a stage that printed plain lines ends with one saying it is done."""
        if self.plain and self.lines and finished and self.printed != self.n:
            self._line(time.monotonic())
        self.bar.close()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(finished=kind is None)
