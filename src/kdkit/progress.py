"""Progress for long work: a bar on a terminal, nothing that floods a log file.

A tqdm bar redraws itself with carriage returns; written into a file (CI, ``2>log``) that
is tens of kilobytes of carriage-return updates. :func:`progress_bar` is a tqdm bar when stderr is
a terminal and a disabled one otherwise; callers then print a plain line at their natural
milestones (the loop: one per epoch).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; disabled when stderr is not a TTY."""
    if not sys.stderr.isatty():
        kwargs["disable"] = True
    return tqdm(**kwargs)
