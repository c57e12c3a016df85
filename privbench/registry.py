"""Name -> object registries, so that `--method`, `--dataset` and `--attack` resolve in one place."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from privbench.errors import PrivbenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from lower-case names to registered objects of one kind."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        key = name.strip().lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PrivbenchError(
                f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(sorted(self._items))}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
