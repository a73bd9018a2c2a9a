"""Name -> object registries used for every pluggable piece (advantages, losses, tasks, ...)."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from mmpo.errors import UnknownNameError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """A " Did you mean 'x'?" suffix, or "" when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A named collection of callables or classes.

    >>> LOSSES = Registry("policy loss")
    >>> @LOSSES.register("ppo_clip")
    ... def ppo_clip(...): ...
    >>> LOSSES.get("ppo_clip")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for n in (name, *aliases):
                if n in self._items and self._items[n] is not obj:
                    raise ValueError(f"{self.kind} '{n}' is registered twice")
                self._items[n] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            valid = ", ".join(sorted(self._items))
            raise UnknownNameError(
                f"Unknown {self.kind} '{name}'.{did_you_mean(str(name), list(self._items))} Valid names: {valid}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def state_class(fn: Any) -> type | None:
    """The state class of a stateful registry entry (``fn.state_cls``), or None."""
    return getattr(fn, "state_cls", None)
