"""Errors kdkit raises for bad input: each names the problem and the fix.

The CLI prints a :class:`KdkitError` as one line (no stack trace); anything else is a bug.
"""

from __future__ import annotations

MAX_PROBLEM_CHARS = 600  # a value echoed in an error (a YAML alias bomb, ...) is cut here
MAX_LISTED_PROBLEMS = 20  # a config error lists at most this many problems ...
MAX_LISTED_CHARS = 3000  # ... in at most about this many characters, then counts the rest


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``).

    Errors echo what the user wrote (a YAML key, a model name); a line break in it must
    not split the one error line, nor a carriage return or a bidi override disguise it.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode()
                   for c in text)


def _clip(text: str) -> str:
    text = one_line(text)
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "..."


class KdkitError(Exception):
    """A user-facing error: bad config, missing file, mismatched models, ...

    The message is kept on one line (see :func:`one_line`): the CLI prints it as
    ``kdkit: error: <message>``.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0]),)
        super().__init__(*args)


class ConfigError(KdkitError):
    """A configuration file or argument is invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [_clip(p) for p in ([problems] if isinstance(problems, str) else problems)]
        head = f"invalid config {one_line(source)}" if source else "invalid config"
        if len(self.problems) == 1:
            msg = f"{head}: {self.problems[0]}"
        else:
            listed: list[str] = []
            for p in self.problems:
                if len(listed) == MAX_LISTED_PROBLEMS or sum(map(len, listed)) > MAX_LISTED_CHARS:
                    break
                listed.append(p)
            rest = len(self.problems) - len(listed)
            if rest:
                listed.append(f"... and {rest:,} more problem{'s' if rest > 1 else ''}")
            msg = head + ":\n" + "\n".join(f"  - {p}" for p in listed)
        Exception.__init__(self, msg)  # the problem lines are one line each already


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
