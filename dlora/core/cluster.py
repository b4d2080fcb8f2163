"""Cluster: the replicas, the dispatcher and the migrator; submit(), view(), apply().

Pure decisions and bookkeeping; the drivers (`dlora/sim`, `dlora/live`) call it and move
time. A request that cannot fit any replica is rejected with a reason, never lost."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from ..types import Adapter, Batch, MigrateMode, Request, RequestStatus
from ..views import Action, ClusterView, DropAdapter, LoadAdapter, MigrateRequest, ReplicaView
from .context import AdapterCatalog
from .dispatch import Dispatcher
from .replica import AdmissionError, ReplicaScheduler
from .snapshot import MigrationView, RequestSnapshot
from .work import OutputLengthEstimate

log = logging.getLogger(__name__)
T = TypeVar("T")


class _PerReplica(Sequence[T]):
    """One value per replica, each built on first access (`_build`)."""

    __slots__ = ("_items",)

    def __init__(self, n: int) -> None:
        self._items: list[T | None] = [None] * n

    def _build(self, i: int) -> T:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i = range(len(self._items))[i]  # a negative index names the same replica
        v = self._items[i]
        if v is None:
            v = self._items[i] = self._build(i)
        return v

    def __iter__(self) -> Iterator[T]:
        for i in range(len(self._items)):
            yield self[i]


class LazyViews(_PerReplica[ReplicaView]):
    """The replicas' views, each built (and brought up to date) on first access."""

    __slots__ = ("_cluster", "_now")

    def __init__(self, cluster: Cluster, now: float) -> None:
        super().__init__(len(cluster.replicas))
        self._cluster = cluster
        self._now = now

    def _build(self, i: int) -> ReplicaView:
        return self._cluster.view_of(i, self._now)

    def many(self, ids: Sequence[int]) -> list[ReplicaView]:
        """The views of replicas `ids` (non-negative), in that order, those not yet built built
        together (`Cluster.views_of`)."""
        views = self._items
        missing = [i for i in ids if views[i] is None]
        if missing:
            for i, v in zip(missing, self._cluster.views_of(missing, self._now), strict=True):
                views[i] = v
        return [views[i] for i in ids]  # type: ignore[misc]


class LazySnapshots(_PerReplica[tuple[RequestSnapshot, ...]]):
    """The replicas' request snapshots (`request_snapshots`), each built on first access: a
    migration check reads those of the replicas it chooses (within the check, when nothing
    changes)."""

    __slots__ = ("_replicas",)

    def __init__(self, replicas: Sequence[ReplicaScheduler]) -> None:
        super().__init__(len(replicas))
        self._replicas = replicas

    def _build(self, i: int) -> tuple[RequestSnapshot, ...]:
        return self._replicas[i].request_snapshots()


class Cluster:
    def __init__(self, replicas: Sequence[ReplicaScheduler], dispatcher: Dispatcher,
                 lengths: OutputLengthEstimate | None = None,
                 adapters: AdapterCatalog | None = None) -> None:
        self.replicas = list(replicas)
        self.dispatcher = dispatcher
        self.lengths = lengths or OutputLengthEstimate()
        # the catalog the dispatcher, placement and migrator read (their DispatchContext's)
        self.adapters = adapters if adapters is not None else AdapterCatalog()
        self.requests: dict[int, Request] = {}
        self.rejected: list[Request] = []
        self.num_migrations = 0
        self.placer = dispatcher.placer  # placement-aware dispatchers
        # requests inside a replica's iteration in flight (the driver's `begin_step` /
        # `end_step`); migrating one waits for that iteration to end (`run_deferred`)
        self.in_flight: dict[int, tuple[int, ...]] = {}
        self.deferred: dict[int, list[MigrateRequest]] = {}
        # set by a driver whose replicas can lag behind `now` (the simulator's fast path):
        # `before_read` brings one up to date; `unapplied` says what a view must add without
        # doing so (output tokens, and a function giving the KV blocks, of the iterations that
        # ran or are in flight)
        self.before_read: Callable[[int, float], None] | None = None
        self.unapplied: Callable[[int, float], tuple[int, Callable[[], int] | None]] | None = None

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
            LazySnapshots(self.replicas),
            tuple(r.memory_limits() for r in self.replicas),
            self.lengths.mean_output_tokens,
            lambda i: self.replicas[i].total_work_s(),
        )

    def view(self, now: float) -> ClusterView:
        """The cluster as decisions see it; each replica's view is built when first read
        (`view_of`), so a dispatcher that reads only its adapter's holders costs as many views,
        whatever the number of replicas."""
        return ClusterView(now, LazyViews(self, now), tuple(r.id for r in self.replicas if r.is_alive),
                           self.resident_on)

    def resident_on(self, adapter: int) -> tuple[int, ...]:
        """Replicas where the adapter is resident (placement and jumps never hide one)."""
        return tuple(r.id for r in self.replicas if adapter in r.memory.adapters)

    def observe(self, replica: int, now: float) -> None:
        """Bring one replica up to `now` before anything reads its requests or changes it (the
        driver's `before_read`: the simulator applies the decode iterations its fast path
        covered)."""
        if self.before_read is not None:
            self.before_read(replica, now)

    def view_of(self, replica: int, now: float) -> ReplicaView:
        """One replica's view at `now`. A lagging replica (the simulator's fast path) is not
        brought up to date: its view counts the iterations not yet applied (`unapplied`), so
        reading it costs the same whatever the replica did since it was last changed."""
        rep = self.replicas[replica]
        if self.unapplied is None:
            return rep.view(now)
        return rep.view(now, *self.unapplied(replica, now))

    def views_of(self, ids: Sequence[int], now: float) -> list[ReplicaView]:
        """`view_of` for each of `ids`, in one loop (a dispatch reads every holder)."""
        reps = self.replicas
        unapplied = self.unapplied
        if unapplied is None:
            return [reps[i].view(now) for i in ids]
        return [reps[i].view(now, *unapplied(i, now)) for i in ids]

    def could_run(self, request: Request) -> bool:
        """Whether a replica could ever hold the request (else `submit` rejects it)."""
        try:
            self.replicas[0].check_fits(request)
        except AdmissionError:
            return False
        return True

    def submit(self, request: Request, now: float) -> ReplicaScheduler | None:
        """Dispatch an arriving request; returns its replica, or None if rejected."""
        self.requests[request.id] = request
        try:
            self.replicas[0].check_fits(request)
        except AdmissionError as exc:
            self.reject(request, now, str(exc))
            return None
        rid = self.dispatcher.choose(request, self.view(now), now)
        self.observe(rid, now)
        replica = self.replicas[rid]
        replica.add(request, now)
        return replica

    def register_adapter(self, adapter: Adapter) -> None:
        """Serve one more adapter (run-time loading; a live cluster's lock held): the one way
        the dispatcher, placement, migrator and batching policies learn of it (they read the
        catalog: `core/context.py`) and every replica's own table (sized by its policy)."""
        self.adapters.add(adapter)
        for rep in self.replicas:
            rep.add_adapter(adapter)

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
            for rid in ((act.source, act.destination) if isinstance(act, MigrateRequest) else (act.replica,)):
                self.observe(rid, now)
            if isinstance(act, MigrateRequest):
                self._migrate(act, now)
                touched += [self.replicas[act.source], self.replicas[act.destination]]
            elif isinstance(act, LoadAdapter):
                self.replicas[act.replica].prefetch_adapter(act.adapter_id)
                touched.append(self.replicas[act.replica])
            elif isinstance(act, DropAdapter) and self.replicas[act.replica].drop_adapter(act.adapter_id):
                touched.append(self.replicas[act.replica])
        return touched

    def begin_step(self, replica: int, batch: Batch) -> None:
        """`batch` goes to `replica`'s executor (a simulated jump: its first iteration's batch):
        a migration of one of its requests waits until the step ends (`run_deferred`)."""
        self.in_flight[replica] = batch.request_ids

    def end_step(self, replica: int) -> None:
        """`replica` runs no step now (the driver calls it before it schedules the next): its
        requests may move again; migrations that waited run by `run_deferred`."""
        self.in_flight[replica] = ()

    def run_deferred(self, replica: int, now: float) -> list[ReplicaScheduler]:
        """Carry out migrations that waited for `replica`'s iteration to end (the driver calls
        this between iterations); returns the destinations."""
        acts = self.deferred.pop(replica, None)
        if not acts:
            return []
        self.end_step(replica)
        for act in acts:
            self.observe(act.destination, now)
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
        self._lift(src, r)
        r.num_migrations += 1
        dst.add(r, now)
        if kv_tokens:
            dst.expect_transfer(r, kv_tokens)
        src.stats.migrated_out += 1
        dst.stats.migrated_in += 1
        self.num_migrations += 1

    def evacuate(self, replica_id: int, now: float,
                 on_rejected: Callable[[Request], None] | None = None) -> list[ReplicaScheduler]:
        """Mark a replica dead and move its unfinished requests to the live replicas the
        dispatcher chooses (recomputed there; not counted as migrations). With no live replica
        left they are rejected, never lost (`on_rejected` is called for each, right after).
        Migrations that waited for its step are dropped. Returns each moved request's new
        replica, in order."""
        rep = self.replicas[replica_id]
        rep.is_alive = False
        self.end_step(replica_id)
        self.deferred.pop(replica_id, None)
        moving = list(rep.unfinished)
        log.error("replica %d marked dead; moving its %d requests", replica_id, len(moving))
        moved: list[ReplicaScheduler] = []
        for r in moving:
            self._lift(rep, r)
            try:
                dst = self.dispatcher.choose(r, self.view(now), now)
            except RuntimeError:
                self.reject(r, now, "every replica failed")
                if on_rejected is not None:
                    on_rejected(r)
                continue
            self.observe(dst, now)
            self.replicas[dst].add(r, now)
            moved.append(self.replicas[dst])
        return moved

    def _lift(self, src: ReplicaScheduler, r: Request) -> None:
        """Take `r` off `src` to be queued elsewhere: its KV there is freed (recompute), it
        waits again."""
        src.remove(r)
        r.computed_tokens = 0
        r.status = RequestStatus.WAITING
