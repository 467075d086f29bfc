"""Errors kdkit raises for bad input: each names the problem and the fix.

The CLI prints a :class:`KdkitError` as one line (no stack trace); anything else is a bug.
"""

from __future__ import annotations

MAX_PROBLEM_CHARS = 600  # a value echoed in an error (a YAML alias bomb, ...) is cut here


def _clip(text: str) -> str:
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "..."


class KdkitError(Exception):
    """A user-facing error: bad config, missing file, mismatched models, ..."""


class ConfigError(KdkitError):
    """A configuration file or argument is invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [_clip(p) for p in ([problems] if isinstance(problems, str) else problems)]
        head = f"invalid config {source}" if source else "invalid config"
        if len(self.problems) == 1:
            msg = f"{head}: {self.problems[0]}"
        else:
            msg = head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class DataError(KdkitError):
    """A dataset file is missing, corrupt or cannot be fetched."""


class CheckpointError(KdkitError):
    """A checkpoint is missing, corrupt or does not match the model it is loaded into."""


class NonFiniteLossError(KdkitError):
    """A loss term became NaN or infinite during training."""

    def __init__(
        self, term: str, step: int, epoch: int, value: float, *, checkpoint_kept: bool = True
    ) -> None:
        self.term, self.step, self.epoch, self.value = term, step, epoch, value
        kept = ("its last good checkpoint is kept" if checkpoint_kept
                else "no checkpoint had been written yet")
        super().__init__(
            f"loss term '{term}' became {value} at step {step} (epoch {epoch}); "
            f"the run stopped and {kept}. Lower the learning rate, "
            "check the inputs for NaN, or add gradient clipping (train.grad_clip)."
        )
