"""The limits and tables the core's objects share, in one home (built by `dlora.build`).

- `ReplicaConfig`: a replica's batch caps and preemption rule. The one place
  `max_batch_size` is stored; everything else reads it from here (the contexts below, the work
  estimate, the queue view a policy plans over).
- `AdapterCatalog`: the adapters the cluster serves, by id, and their ranks. One table that
  dispatchers, placement and migrators read (through `DispatchContext.adapters`) and batching
  policies read the ranks of (`PolicyContext.adapter_ranks`, a read-only view that follows the
  catalog). It grows only by `add`, which `Cluster.register_adapter` calls (run-time adapter
  loading in `dlora serve`); each replica keeps its own sized copy (`ReplicaScheduler.add_adapter`).
- `PolicyContext`: what a batching policy knows about its replica.
- `DispatchContext`: what dispatchers, placement and migrators know about the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..latency import LatencyModel
from ..types import Adapter
from .memory import MemoryConfig


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    max_batch_size: int = 16  # sequences per iteration
    max_batched_tokens: int = 4096  # tokens per iteration (prefill is chunked to fit)
    preemption: str = "auto"  # recompute | swap | auto (cheaper by the profile's estimate)


class AdapterCatalog(Mapping[int, Adapter]):
    """The adapters served, by id (read-only as a mapping; `add` is the one way to grow it)."""

    __slots__ = ("_by_id", "_ranks", "ranks")

    def __init__(self, adapters: Mapping[int, Adapter] | None = None) -> None:
        self._by_id: dict[int, Adapter] = dict(adapters or {})
        self._ranks: dict[int, int] = {a.id: a.rank for a in self._by_id.values()}
        self.ranks: Mapping[int, int] = MappingProxyType(self._ranks)  # follows `add`

    def __getitem__(self, adapter_id: int) -> Adapter:
        return self._by_id[adapter_id]

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._by_id

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, adapter: Adapter) -> None:
        """Serve one more adapter (or replace one of the same id)."""
        self._by_id[adapter.id] = adapter
        self._ranks[adapter.id] = adapter.rank


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a batching policy may know about its replica."""

    latency: LatencyModel
    adapter_ranks: Mapping[int, int]  # adapter id -> rank (an `AdapterCatalog`'s `ranks`)
    config: ReplicaConfig = field(default_factory=ReplicaConfig)
    replica: int = 0

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size


@dataclass(frozen=True, slots=True)
class DispatchContext:
    """What dispatchers, placement and migrators may know about the cluster. `memory` is the
    replicas' pool as the scenario configures it (before a baseline reshapes its own)."""

    latency: LatencyModel
    adapters: Mapping[int, Adapter]  # an `AdapterCatalog` when built by `dlora.build`
    num_replicas: int
    seed: int
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    memory: MemoryConfig | None = None

    @property
    def max_batch_size(self) -> int:
        return self.replica.max_batch_size

    @property
    def max_adapter_slots(self) -> int | None:
        return self.memory.max_adapter_slots if self.memory is not None else None

    @property
    def adapter_budget_bytes(self) -> int | None:
        """The adapters' share of a replica's pool under a static split; None: unified."""
        return self.memory.adapter_budget_bytes if self.memory is not None else None

    @property
    def memory_capacity_bytes(self) -> int | None:
        """A replica's device bytes for KV and adapters together."""
        return self.memory.capacity_bytes if self.memory is not None else None
