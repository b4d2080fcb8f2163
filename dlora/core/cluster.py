"""Cluster: the replicas, the dispatcher and the migrator; submit(), view(), apply().

Pure decisions and bookkeeping; the drivers (`dlora/sim`, `dlora/live`) call it and move
time. A request that cannot fit any replica is rejected with a reason, never lost."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..types import (
    Action,
    ClusterView,
    DropAdapter,
    LoadAdapter,
    MigrateMode,
    MigrateRequest,
    Request,
    RequestStatus,
)
from .dispatch import Dispatcher
from .replica import AdmissionError, ReplicaScheduler
from .snapshot import MigrationView
from .work import OutputLengthEstimate

log = logging.getLogger(__name__)


class Cluster:
    def __init__(self, replicas: Sequence[ReplicaScheduler], dispatcher: Dispatcher,
                 lengths: OutputLengthEstimate | None = None) -> None:
        self.replicas = list(replicas)
        self.dispatcher = dispatcher
        self.lengths = lengths or OutputLengthEstimate()
        self.requests: dict[int, Request] = {}
        self.rejected: list[Request] = []
        self.num_migrations = 0
        self.placer = getattr(dispatcher, "placer", None)  # placement-aware dispatchers
        # requests inside a replica's iteration in flight (set by the driver); migrating one
        # waits for that iteration to end (`run_deferred`)
        self.in_flight: dict[int, tuple[int, ...]] = {}
        self.deferred: dict[int, list[MigrateRequest]] = {}

    def place(self, now: float, initial: bool = False) -> list[ReplicaScheduler]:
        """Run the dispatcher's placement (initial layout, or a periodic re-placement) and
        apply its adapter loads and drops; returns the replicas that changed."""
        if self.placer is None:
            return []
        view = self.view(now)
        actions = self.placer.initial(view) if initial else self.placer.replan(view, now)
        return self.apply(actions, now)

    def migration_view(self, now: float) -> MigrationView:
        """The cluster view plus immutable per-request snapshots of every replica (built only
        when a migrator checks, never per arrival)."""
        return MigrationView(
            self.view(now),
            tuple(r.request_snapshots() for r in self.replicas),
            tuple(r.memory_limits() for r in self.replicas),
            self.lengths.mean_output_tokens,
        )

    def view(self, now: float) -> ClusterView:
        return ClusterView(now, tuple(r.view(now) for r in self.replicas))

    def submit(self, request: Request, now: float) -> ReplicaScheduler | None:
        """Dispatch an arriving request; returns its replica, or None if rejected."""
        self.requests[request.id] = request
        try:
            self.replicas[0].check_fits(request)
        except AdmissionError as exc:
            self.reject(request, now, str(exc))
            return None
        rid = self.dispatcher.choose(request, self.view(now), now)
        replica = self.replicas[rid]
        replica.add(request, now)
        return replica

    def reject(self, request: Request, now: float, reason: str) -> None:
        request.status = RequestStatus.ABORTED
        request.finish_reason = f"rejected: {reason}"
        request.finish_s = now
        self.rejected.append(request)
        log.warning("request %d rejected: %s", request.id, reason)

    def on_finished(self, finished: Sequence[Request]) -> None:
        for r in finished:
            self.lengths.observe(r.generated_tokens)

    def apply(self, actions: Sequence[Action], now: float) -> list[ReplicaScheduler]:
        """Carry out migrations and placement changes; returns the replicas that changed."""
        touched: list[ReplicaScheduler] = []
        for act in actions:
            if isinstance(act, MigrateRequest):
                self._migrate(act, now)
                touched += [self.replicas[act.source], self.replicas[act.destination]]
            elif isinstance(act, LoadAdapter):
                self.replicas[act.replica].prefetch_adapter(act.adapter_id)
                touched.append(self.replicas[act.replica])
            elif isinstance(act, DropAdapter) and self.replicas[act.replica].drop_adapter(act.adapter_id):
                touched.append(self.replicas[act.replica])
        return touched

    def run_deferred(self, replica: int, now: float) -> list[ReplicaScheduler]:
        """Carry out migrations that waited for `replica`'s iteration to end (the driver calls
        this between iterations); returns the destinations."""
        acts = self.deferred.pop(replica, None)
        if not acts:
            return []
        self.in_flight[replica] = ()
        for act in acts:
            self._migrate(act, now)
        return [self.replicas[a.destination] for a in acts]

    def _migrate(self, act: MigrateRequest, now: float) -> None:
        r = self.requests[act.request_id]
        src, dst = self.replicas[act.source], self.replicas[act.destination]
        if r.is_done or r.replica != src.id:
            return
        if act.request_id in self.in_flight.get(src.id, ()):
            self.deferred.setdefault(src.id, []).append(act)
            return
        kv_tokens = r.computed_tokens if act.mode == MigrateMode.TRANSFER else 0
        src.remove(r)
        r.computed_tokens = 0
        r.status = RequestStatus.WAITING
        r.num_migrations += 1
        dst.add(r, now)
        if kv_tokens:
            dst.expect_transfer(r, kv_tokens)
        src.stats.migrated_out += 1
        dst.stats.migrated_in += 1
        self.num_migrations += 1
