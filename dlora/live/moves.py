"""Moving requests between live replicas: the migrator's and placement's actions (through the
core's Cluster, which defers a move of a request in a step in flight until the step ends), the
KV copies of transfer moves (kv_transfer.py), and evacuating a dead replica. Called with the
cluster lock held."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..core.cluster import Cluster
from ..core.replica import ReplicaScheduler
from ..types import MigrateMode, Request
from ..views import Action, MigrateRequest
from .clock import Condition
from .kv_transfer import KVMailbox
from .stats import LiveStats


class Moves:
    def __init__(self, cluster: Cluster, kv: KVMailbox | None, stats: LiveStats,
                 wake: Sequence[Condition], finished: Callable[[Request], None]) -> None:
        self.cluster, self.kv, self.stats, self.wake, self.finished = cluster, kv, stats, wake, finished

    def apply(self, actions: Sequence[Action], now: float) -> None:
        """Migrations and placement changes; a move of a request whose KV is still on its way
        from an earlier move is dropped (the next check may move it again)."""
        pending = self.kv.pending if self.kv is not None else set()
        safe = [a for a in actions if not (isinstance(a, MigrateRequest) and a.request_id in pending)]
        self.stats.dropped_migrations += len(actions) - len(safe)
        transfers = self._transfers(safe)
        for rep in self.cluster.apply(safe, now):
            self.wake[rep.id].notify_all()
        self._expect_kv(transfers)

    def run_deferred(self, replica: int, now: float) -> None:
        """Moves that waited for `replica`'s step (its worker calls this between steps)."""
        acts = self.cluster.deferred.get(replica, [])
        self.stats.deferred_migrations += len(acts)
        transfers = self._transfers(acts)
        for dst in self.cluster.run_deferred(replica, now):
            self.wake[dst.id].notify_all()
        self._expect_kv(transfers)

    def evacuate(self, rep: ReplicaScheduler, now: float) -> None:
        """Mark a replica dead and move its requests to live replicas (`Cluster.evacuate`:
        recomputed there, or rejected when none is left); KV copies on their way for them are
        forgotten."""
        self.stats.dead_replicas.append(rep.id)
        if self.kv is not None:
            for r in rep.unfinished:
                self.kv.forget(r.id)
        for dst in self.cluster.evacuate(rep.id, now, on_rejected=self.finished):
            self.stats.moved_from_dead += 1
            self.wake[dst.id].notify_all()
        self.wake[rep.id].notify_all()

    def _transfers(self, actions: Sequence[Action]) -> list[MigrateRequest]:
        """The KV-transfer moves whose request holds KV on its source now."""
        if self.kv is None:
            return []
        return [a for a in actions if isinstance(a, MigrateRequest) and a.mode == MigrateMode.TRANSFER
                and self._has_kv(a.request_id, a.source)]

    def _has_kv(self, request_id: int, replica: int) -> bool:
        r = self.cluster.requests.get(request_id)
        return r is not None and not r.is_done and r.replica == replica and r.computed_tokens > 0

    def _expect_kv(self, transfers: list[MigrateRequest]) -> None:
        """Register the copies of the moves that happened (deferred ones register later)."""
        for act in transfers:
            r = self.cluster.requests[act.request_id]
            if r.replica == act.destination and r.computed_tokens > 0 and self.kv is not None:
                self.kv.expect(act.source, r.id)
                self.stats.kv_transfers += 1
                self.wake[act.source].notify_all()
