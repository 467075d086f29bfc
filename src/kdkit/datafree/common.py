"""Shared by the data-free stages: replacing a saved artifact safely, and progress reports.

- :func:`replace_artifact` writes a ``stem.safetensors`` + ``stem.json`` artifact (see
  :func:`kdkit.train.checkpoint.save_checkpoint`) that may already exist with other
  contents. Its JSON, which marks an artifact complete, is removed first: a kill while
  the new one is written leaves an *incomplete* artifact (no JSON: readers treat it as
  absent and make it again), never new weights beside old JSON.
- :class:`StageProgress` is a tqdm bar on a terminal; when stderr is not a terminal (a log
  file, CI, a batch job) it writes no ``\\r`` updates, only a plain line every
  :data:`PLAIN_EVERY_S` seconds, so a stage shorter than that prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import Tensor

from kdkit.files import fsync_dir
from kdkit.progress import progress_bar
from kdkit.train.checkpoint import save_checkpoint

PLAIN_EVERY_S = 60.0  # seconds between two plain progress lines when stderr is no terminal
# Optimisation steps (per batch; generator steps for dafl) and Adam learning rates of each
# transfer source, as the papers set them.
DEFAULT_STEPS = {"record": 1000, "deepinversion": 2000, "dafl": 1500}
DEFAULT_LR = {"record": 0.07, "deepinversion": 0.05, "dafl": 0.2}


def replace_artifact(stem: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """:func:`save_checkpoint`, safe when ``stem`` already holds an artifact (see above)."""
    marker = stem.with_suffix(".json")
    if marker.exists():
        marker.unlink()
        fsync_dir(marker.parent)
    save_checkpoint(stem, tensors, meta)


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
