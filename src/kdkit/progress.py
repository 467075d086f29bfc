"""Progress for long work: a bar on a terminal, nothing that floods a log file.

A tqdm bar redraws itself with carriage returns; written into a file (CI, ``2>log``) that
is tens of kilobytes of carriage-return updates. :func:`progress_bar` is a tqdm bar when stderr is
a terminal and a disabled one otherwise; callers then print a plain line at their natural
milestones (the loop: one per epoch).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from tqdm import tqdm


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; disabled when stderr is not a TTY."""
    if not sys.stderr.isatty():
        kwargs["disable"] = True
    return tqdm(**kwargs)


PLAIN_EVERY_S = 60.0  # seconds between two plain progress lines when stderr is no terminal


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
