"""One registry type for everything pluggable (algorithms, tasks).

Built-in plug-ins and third-party packages both arrive through Python entry points
(groups ``rlbench.algorithms`` and ``rlbench.tasks``), so the CLI starts without importing
every plug-in: an entry point is loaded only when its name is asked for, or when the full
list is printed. Code that imports a plug-in module directly registers it with the
``register`` decorator.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(LookupError):
    """An unknown or duplicate plug-in name; the message lists the valid choices."""


def did_you_mean(name: str, choices: list[str]) -> str:
    """A ' (did you mean ...?)' hint for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Maps names to plug-in classes.

    ``kind`` names what is registered ("algorithm", "task") in error messages; ``group`` is
    the entry-point group scanned lazily for plug-ins that are not imported yet.
    """

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        self._entry_points: dict[str, EntryPoint] | None = None

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@ALGORITHMS.register("grpo")``. A second use of a name raises."""

        def decorator(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered by {_qualname(existing)}; "
                    f"cannot register {_qualname(obj)} under the same name"
                )
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The plug-in called ``name``; an unknown name raises with the valid choices."""
        if name not in self._items:
            entry_point = self._discover().get(name)
            if entry_point is not None:
                loaded = entry_point.load()
                # An entry point naming a module registers through the decorator on import;
                # one naming an object (``pkg.mod:Class``) is registered here.
                if not isinstance(loaded, types.ModuleType):
                    self._items.setdefault(name, loaded)
        if name not in self._items:
            choices = self.names()
            raise RegistryError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, choices)}; "
                f"valid {self.kind}s: {', '.join(choices) or '(none registered)'}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        """Every registered or discoverable name, sorted; imports nothing."""
        return sorted(set(self._items) | set(self._discover()))

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[tuple[str, T]]:
        """Loads every plug-in and yields ``(name, plug-in)`` pairs."""
        for name in self.names():
            yield name, self.get(name)

    def _discover(self) -> dict[str, EntryPoint]:
        if self._entry_points is None:
            self._entry_points = {ep.name: ep for ep in entry_points(group=self.group)}
        return self._entry_points


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def summary(obj: object) -> str:
    """First line of a plug-in's docstring: its one-line description in ``rlbench list``."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


ALGORITHMS: Registry = Registry("algorithm", "rlbench.algorithms")
TASKS: Registry = Registry("task", "rlbench.tasks")
