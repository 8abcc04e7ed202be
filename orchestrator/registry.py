"""One generic registry; one instance per plug-in kind (teachers, students, losses, transfer-set sources).

Pattern after timm's ``_registry.py``: plug-ins register under a name, and a miss lists the valid names.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised when a registry has no entry under the requested name; the message lists valid names."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> plug-in table for one kind of plug-in.

    Args:
        kind: human-readable kind ("teacher backend", "transfer-set source", ...), used in error messages.
        group: an entry-point group (``pyproject.toml``'s ``[project.entry-points."<group>"]``) whose entries
            are loaded on first use: plug-ins that live outside the core (e.g. the offline demo material),
            which the core then never imports by name.
    """

    def __init__(self, kind: str, group: str | None = None):
        self.kind, self.group = kind, group
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``. Raises ValueError on a duplicate name."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the plug-in under ``name``. Raises UnknownNameError naming the valid choices."""
        if name not in self._items and self.group:
            self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def _load_entry_points(self) -> None:
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            self._items.setdefault(ep.name, ep.load())

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
