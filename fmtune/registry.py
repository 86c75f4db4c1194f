"""Name -> object registries. A second registration under the same name is an error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fmtune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named entries of one kind (strategies, tasks, zoo models ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is omitted."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str, key: str | None = None) -> T:
        """Look ``name`` up; unknown names raise a ConfigError listing the valid ones."""
        if name not in self._items:
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
