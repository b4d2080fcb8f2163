"""All policy registries in one place, so configs can validate names before any work."""

from __future__ import annotations

from typing import Any

from .batching import BATCH_POLICIES
from .dispatch import DISPATCHERS
from .migration import MIGRATORS

REGISTRIES = {"batching": BATCH_POLICIES, "dispatch": DISPATCHERS, "migration": MIGRATORS}


def _load_plugins() -> None:
    """Import modules that register more policies (kept optional while they are built)."""
    import importlib

    for mod in ("credit", "baselines", "dispatch_dlora", "migration_dlora"):
        try:
            importlib.import_module(f"dlora.core.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dlora.core.{mod}":
                raise


_load_plugins()


def check_policies(section: Any, path: str) -> None:
    for key, registry in REGISTRIES.items():
        ref = getattr(section, key)
        registry.check(ref.name, ref.params, f"{path}.{key}" if path else key)
