"""All policy registries in one place, so configs can validate names before any work."""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from . import baselines, credit, dispatch_dlora, migration_dlora  # noqa: F401  (they register)
from .batching import BATCH_POLICIES
from .dispatch import DISPATCHERS
from .migration import MIGRATORS

REGISTRIES: dict[str, Registry[Any]] = {"batching": BATCH_POLICIES, "dispatch": DISPATCHERS, "migration": MIGRATORS}


def check_policies(section: Any, path: str) -> None:
    for key, registry in REGISTRIES.items():
        ref = getattr(section, key)
        registry.check(ref.name, ref.params, f"{path}.{key}" if path else key)
