"""A name -> builder registry (models, data sets): duplicate names raise, unknown names list the
known (and the closest, for a misspelling)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

Builder = TypeVar("Builder", bound=Callable)


class Registry(Generic[Builder]):
    """Builders registered by name; ``kind`` ("model", "dataset") words the errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Builder] = {}

    def register(self, name: str) -> Callable[[Builder], Builder]:
        """Decorator registering ``builder`` under ``name``; a second registration of a name raises."""

        def decorator(builder: Builder) -> Builder:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> Builder:
        try:
            return self._builders[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}{hint}; available: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._builders)
