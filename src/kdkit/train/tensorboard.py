"""Live TensorBoard logging (``--tensorboard``; needs the ``tensorboard`` extra).

When switched on, every run that writes a run directory also writes TensorBoard event
files into ``RUN_DIR/tensorboard/``: each epoch's record (every loss term, the learning
rate, training accuracy, validation accuracy and loss, and extras such as CTKD's
temperature) as scalars against the epoch, and the ``log_every`` step records against the
global step. An experiment's figures (``kdkit report``) and data-free transfer sets are
added as images. ``tensorboard --logdir RUN_OR_EXPERIMENT_DIR`` shows them, one run per
folder. Under torchrun rank 0 alone writes, as for ``metrics.jsonl``.

The switch is process-wide (the CLI sets it once); ``kdkit run --jobs`` passes it on to its
sub-run processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError

FOLDER = "tensorboard"
_ENABLED = False


def enable(on: bool = True) -> None:
    """Switch TensorBoard logging on (checking the package imports) or off."""
    global _ENABLED
    if on:
        _require()
    _ENABLED = on


def enabled() -> bool:
    return _ENABLED


def _require() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise KdkitError("--tensorboard needs the tensorboard package: pip install "
                         "'kdkit[tensorboard]'") from None
    return SummaryWriter


class EpochWriter:
    """Writes a run's epoch and step records as scalars; closed by :meth:`close`."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = _require()(log_dir=str(run_dir / FOLDER))

    def record(self, rec: dict[str, Any]) -> None:
        """One metrics.jsonl record: an epoch's (x = epoch) or a step's (x = global step)."""
        step = rec.get("global_step")
        x = int(rec["epoch"]) if step is None else int(step)
        prefix = "" if step is None else "step/"
        for k, v in rec.items():
            if k in ("epoch", "step", "global_step") or not isinstance(v, (int, float)):
                continue
            self.writer.add_scalar(prefix + k, float(v), x)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def writer_for(run_dir: Path | None) -> EpochWriter | None:
    """A writer for ``run_dir`` when logging is on (and there is a directory), else None."""
    return EpochWriter(run_dir) if _ENABLED and run_dir is not None else None


def add_images(log_dir: Path, images: dict[str, Path], step: int = 0) -> None:
    """Add PNG files (e.g. an experiment's report figures) as images under their tags."""
    if not _ENABLED or not images:
        return
    import numpy as np
    from PIL import Image

    writer = _require()(log_dir=str(log_dir / FOLDER))
    try:
        for tag, path in images.items():
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            writer.add_image(tag, arr, step, dataformats="HWC")
    finally:
        writer.close()
