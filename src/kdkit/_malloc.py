"""glibc's malloc, tuned for training loops: keep freed memory instead of giving it back.

A training step allocates and frees the same large buffers (activations, gradients,
optimiser temporaries) over and over. glibc's defaults hand such memory back to the kernel
as soon as it is freed: blocks above the *mmap threshold* (128 KiB at start, raised
dynamically up to 32 MiB) are ``mmap``-ed and ``munmap``-ed each time, and a free region of
more than the *trim threshold* at the top of a heap is released (``sbrk``/``madvise``). The
next step asks for the same memory again, and the kernel serves every 4 KiB page of it
with a minor page fault and zeroes it. Measured on CPU training (kdkit and torchdistill
alike), that was 25-35 % of the CPU time, 1.5-14.7 M faults a run.

:func:`tune_allocator` sets, through ``mallopt``:

- ``M_MMAP_THRESHOLD`` = 32 MiB, the largest glibc accepts on 64-bit systems (half of its
  64 MiB heap size; a larger value is ignored, though ``mallopt`` may still report success):
  blocks up to 32 MiB come from the heap, and setting it also turns off the dynamic
  threshold, so the heap is used from the first step on;
- ``M_TRIM_THRESHOLD`` = 1 GiB: free memory at the top of a heap is released only beyond
  1 GiB, so the memory of one step is reused by the next;
- ``M_TOP_PAD`` = 64 MiB: each time a heap grows it grows by 64 MiB more than asked, so a
  growing working set takes few system calls.

The three go together. Setting any of them also freezes glibc's dynamic thresholds at
their start values (128 KiB) for the others, so one alone does little or harm. Measured by
``benchmarks/malloc.py`` (live KD plain_cnn4 -> plain_cnn2, 1x28x28 images, batch 128,
one thread, 79 steps): glibc's defaults took 58-96 CPU ms per step over five runs (0.17-1.45 M
minor faults, depending on how the dynamic thresholds happened to move); the three settings
53-55 ms (8-12 k faults) every time. Alone, the mmap threshold or the top pad stayed within
the defaults' range, and the trim threshold made it worse (143-158 ms, 3.3 M faults).

The cost is memory held rather than returned: the process's resident size stays at its
high-water mark (plus at most 1 GiB of free heap top), which is what a training process
reaches every step anyway. Blocks above 32 MiB are still ``mmap``-ed.

Only glibc on Linux has ``mallopt``; elsewhere (macOS, Windows, musl) or when another
allocator is preloaded (jemalloc, tcmalloc, mimalloc) nothing is done. ``KDKIT_MALLOC=default``
keeps glibc's defaults (to measure them, or if holding the memory is unwelcome).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

MIB = 2**20
SETTINGS: tuple[tuple[int, int], ...] = (
    (M_MMAP_THRESHOLD, 32 * MIB),
    (M_TRIM_THRESHOLD, 1024 * MIB),
    (M_TOP_PAD, 64 * MIB),
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc_mallopt() -> Any:
    """glibc's ``mallopt``, or None when this process does not allocate with glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):  # type: ignore[union-attr]
            return None
    except (AttributeError, ValueError, OSError):
        return None
    preload = os.environ.get("LD_PRELOAD", "").lower()
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return None
    try:
        fn = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def apply_mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    """Call ``mallopt(param, value)`` for each pair; True if glibc accepted every one.
    Never raises; False (nothing done) where there is no glibc malloc."""
    try:
        fn = _glibc_mallopt()
        if fn is None:
            return False
        return all([fn(param, value) == 1 for param, value in settings])
    except Exception:  # a tuning must never stop a run
        return False


def tune_allocator() -> bool:
    """Apply :data:`SETTINGS` (see the module's doc) to glibc's malloc; True if applied.

    A no-op returning False off Linux/glibc, under a preloaded allocator, or when the
    environment variable ``KDKIT_MALLOC`` is ``default``. Never raises. Call it once, early
    (before the first training step); calling it again does no harm.
    """
    if os.environ.get("KDKIT_MALLOC", "").strip().lower() == "default":
        return False
    return apply_mallopt(SETTINGS)
