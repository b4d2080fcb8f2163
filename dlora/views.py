"""What policies read of the cluster and what they ask of it: `ReplicaView` (an immutable
snapshot of one replica), `ClusterView`, and the actions (`LoadAdapter`, `DropAdapter`,
`MigrateRequest`) that dispatchers, placement and migrators return."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .types import MigrateMode

_VIEW_FIELDS = ("id", "is_alive", "num_waiting", "num_running", "num_swapped", "resident_adapters",
                "merged_adapter", "queued_work_s", "requests_per_adapter", "adapter_slots_free", "backlog_s")


class ReplicaView:
    """An immutable snapshot of one replica, for policies.

    Its KV fields (`kv_blocks_used`, `kv_blocks_total`) may be computed on first read
    (`ReplicaView.deferred`), from values taken with the view: a dispatcher that ranks by
    backlog and residency never pays for them (the simulator builds a view per candidate per
    arrival, and a replica in a fast-path jump must count the blocks of its unapplied
    iterations). The other fields are kept in one tuple (read through properties): a view
    is built in two stores, whatever its number of fields."""

    __slots__ = ("_f", "_kv")

    id: int
    is_alive: bool
    num_waiting: int
    num_running: int
    num_swapped: int
    resident_adapters: frozenset[int]
    merged_adapter: int | None
    queued_work_s: float  # estimated seconds to drain what it holds
    requests_per_adapter: tuple[tuple[int | None, int], ...]  # (adapter, unfinished count)
    adapter_slots_free: int
    # seconds to drain at full-batch throughput (pending prefill + expected decode tokens);
    # unlike queued_work_s it grows with every request, so it ranks lightly loaded replicas
    backlog_s: float
    _f: tuple[Any, ...]
    _kv: tuple[int, int] | Callable[[], tuple[int, int]]

    def __init__(self, id: int, is_alive: bool, num_waiting: int, num_running: int, num_swapped: int,
                 kv_blocks_used: int, kv_blocks_total: int, resident_adapters: frozenset[int],
                 merged_adapter: int | None, queued_work_s: float,
                 requests_per_adapter: tuple[tuple[int | None, int], ...], adapter_slots_free: int,
                 backlog_s: float = 0.0) -> None:
        set_ = object.__setattr__
        set_(self, "_f", (id, is_alive, num_waiting, num_running, num_swapped, resident_adapters, merged_adapter,
                          queued_work_s, requests_per_adapter, adapter_slots_free, backlog_s))
        set_(self, "_kv", (kv_blocks_used, kv_blocks_total))

    @classmethod
    def deferred(cls, fields: tuple[Any, ...], kv: Callable[[], tuple[int, int]]) -> ReplicaView:
        """A view of `fields` (`_VIEW_FIELDS`, in order) whose (kv_blocks_used, kv_blocks_total)
        are `kv()`, called once, on first read; `kv` must compute them from values taken when
        the view is (a pure function)."""
        assert len(fields) == len(_VIEW_FIELDS)
        v = object.__new__(cls)
        set_ = object.__setattr__
        set_(v, "_f", fields)
        set_(v, "_kv", kv)
        return v

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ReplicaView is immutable (cannot set {name})")

    def _kv_pair(self) -> tuple[int, int]:
        kv = self._kv
        if not isinstance(kv, tuple):
            kv = kv()
            object.__setattr__(self, "_kv", kv)
        return kv

    @property
    def kv_blocks_used(self) -> int:
        return self._kv_pair()[0]

    @property
    def kv_blocks_total(self) -> int:
        return self._kv_pair()[1]

    @property
    def num_requests(self) -> int:
        f = self._f
        return f[2] + f[3] + f[4]

    def rank_facts(self) -> tuple[int, frozenset[int], float, int]:
        """(num_requests, resident_adapters, backlog_s, id) in one read (a dispatch ranks every
        holder of an adapter by them)."""
        f = self._f
        return f[2] + f[3] + f[4], f[5], f[10], f[0]

    @property
    def kv_usage(self) -> float:
        used, total = self._kv_pair()
        return used / total if total else 0.0

    def _fields(self) -> tuple[object, ...]:
        f = self._f
        return (*f[:5], *self._kv_pair(), *f[5:])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReplicaView):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        names = (*_VIEW_FIELDS[:5], "kv_blocks_used", "kv_blocks_total", *_VIEW_FIELDS[5:])
        return "ReplicaView(" + ", ".join(f"{n}={v!r}" for n, v in zip(names, self._fields(), strict=True)) + ")"


def _view_field(i: int) -> property:
    return property(lambda self: self._f[i])


for _i, _name in enumerate(_VIEW_FIELDS):  # the tuple's fields as read-only attributes
    setattr(ReplicaView, _name, _view_field(_i))


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What dispatchers, placers and migrators see of the cluster. `replicas` may build each
    view only when it is read (`core.cluster.LazyViews`), so a decision that reads two replicas
    costs two views whatever the cluster's size; `alive_ids` and `resident_on` answer without
    building any."""

    now_s: float
    replicas: Sequence[ReplicaView]
    alive_ids: tuple[int, ...] | None = None  # None: read from the views
    resident_index: Callable[[int], tuple[int, ...]] | None = None  # adapter -> replicas holding it

    def alive(self) -> tuple[int, ...]:
        """Ids of the live replicas, in id order."""
        if self.alive_ids is not None:
            return self.alive_ids
        return tuple(r.id for r in self.replicas if r.is_alive)

    def views(self, ids: Sequence[int]) -> list[ReplicaView]:
        """The views of replicas `ids`, in that order (built together where `replicas` can:
        `core.cluster.LazyViews.many`)."""
        many = getattr(self.replicas, "many", None)
        if many is not None:
            return many(ids)
        return [self.replicas[i] for i in ids]

    def resident_on(self, adapter: int) -> tuple[int, ...]:
        """Ids of the replicas (live or not) where the adapter is resident, in id order."""
        if self.resident_index is not None:
            return self.resident_index(adapter)
        return tuple(r.id for r in self.replicas if adapter in r.resident_adapters)


@dataclass(frozen=True, slots=True)
class LoadAdapter:
    replica: int
    adapter_id: int


@dataclass(frozen=True, slots=True)
class DropAdapter:
    replica: int
    adapter_id: int


@dataclass(frozen=True, slots=True)
class MigrateRequest:
    request_id: int
    source: int
    destination: int
    mode: MigrateMode


Action = LoadAdapter | DropAdapter | MigrateRequest
