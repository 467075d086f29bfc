"""A small generic registry: name -> factory, with a one-line summary for listings."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kdkit.errors import KdkitError

T = TypeVar("T")


def _shown(name: object, limit: int = 80) -> str:
    """A name as an error quotes it: a string in quotes, anything else as its repr; clipped."""
    text = f"'{name}'" if isinstance(name, str) else repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


class Registry(Generic[T]):
    """Maps names to factories. ``kind`` ("model", "dataset", "method") appears in errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        # the command that lists them ('kdkit datasets' does not exist)
        self.listing = "kdkit data list" if kind == "dataset" else f"kdkit {kind}s"
        self._items: dict[str, Callable[..., T]] = {}
        self._summaries: dict[str, str] = {}

    def register(
        self, name: str, summary: str | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``fn`` under ``name``; summary defaults to the docstring's first line."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise KdkitError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            doc = (fn.__doc__ or "").strip().splitlines()
            self._summaries[name] = summary or (doc[0] if doc else "")
            return fn

        return deco

    def add(self, name: str, fn: Callable[..., T], summary: str) -> None:
        """Register ``fn`` under ``name`` (for factories made in a loop)."""
        self.register(name, summary)(fn)

    def names(self) -> list[str]:
        return sorted(self._items)

    def summary(self, name: str) -> str:
        self.get(name)
        return self._summaries[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def get(self, name: str) -> Callable[..., T]:
        if not isinstance(name, str):  # a name read from a file may be anything
            raise KdkitError(f"a {self.kind} name must be a string, got {_shown(name)}. "
                             f"Run `{self.listing}` to list them.")
        if name not in self._items:
            close = difflib.get_close_matches(name[:200], self._items, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KdkitError(
                f"unknown {self.kind} {_shown(name)}.{hint} "
                f"Run `{self.listing}` to list them."
            )
        return self._items[name]

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """Keyword parameters the factory accepts (for config validation)."""
        return dict(inspect.signature(self.get(name)).parameters)

    def check_kwargs(self, name: str, kwargs: dict[str, Any]) -> list[str]:
        """Return a list of problems with ``kwargs`` for factory ``name`` (empty if fine)."""
        params = self.parameters(name)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return []
        problems = []
        for key in kwargs:
            if key not in params:
                close = difflib.get_close_matches(key, params, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(
                    f"{self.kind} '{name}' has no argument '{key}'{hint}; "
                    f"it takes: {', '.join(params) or 'nothing'}"
                )
        return problems

    def create(self, name: str, **kwargs: Any) -> T:
        fn = self.get(name)
        problems = self.check_kwargs(name, kwargs)
        if problems:
            raise KdkitError("; ".join(problems))
        return fn(**kwargs)
