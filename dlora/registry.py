"""Name -> class registries: the names a scenario YAML uses are the registry names.

Each entry has a parameters dataclass (validated strictly with `dlora.config.load_into`) and a
factory `cls(params, context)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .config import load_into
from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NoParams:
    """A policy without parameters."""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[Callable[..., T], type]] = {}

    def register(self, name: str, params: type = NoParams) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = (factory, params)
            return factory

        return deco

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def check(self, name: str, params: dict[str, Any] | None, path: str) -> Any:
        """Validate a name and its parameters; return the parameters dataclass."""
        if name not in self._entries:
            raise ConfigError(f"{path}.name: must be one of {', '.join(self.names())}, got {name!r}")
        _, params_cls = self._entries[name]
        return load_into(params_cls, params or {}, f"{path}.params")

    def create(self, name: str, params: dict[str, Any] | None, path: str, *args: Any, **kwargs: Any) -> T:
        parsed = self.check(name, params, path)
        factory, _ = self._entries[name]
        return factory(parsed, *args, **kwargs)
