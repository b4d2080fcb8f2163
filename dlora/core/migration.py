"""Migrators: periodic checks that move requests (with their adapters) between replicas.

`none` never migrates. The dLoRA reactive co-migration (PAPER.md section 5) registers here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..registry import Registry
from ..views import Action, ClusterView
from .context import DispatchContext

if TYPE_CHECKING:
    from .cluster import Cluster


class Migrator(Protocol):
    interval_s: float | None  # seconds between checks; None: never called

    def bind(self, cluster: Cluster) -> None:
        """The cluster this migrator serves (`dlora.build` calls it once): a migrator that
        reads per-request snapshots asks it for `migration_view`."""
        ...

    def plan(self, view: ClusterView, now: float) -> list[Action]: ...

    def stats(self) -> dict[str, Any]: ...


MIGRATORS: Registry[Migrator] = Registry("migrator")


@MIGRATORS.register("none")
class NoMigration:
    interval_s: float | None = None

    def __init__(self, params: Any, ctx: DispatchContext | None = None) -> None:
        pass

    def bind(self, cluster: Cluster) -> None:
        return None

    def plan(self, view: ClusterView, now: float) -> list[Action]:
        return []

    def stats(self) -> dict[str, Any]:
        return {}
