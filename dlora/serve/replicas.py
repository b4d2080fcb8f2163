"""The server's executors and its run-time adapter changes.

`ServingExecutor` wraps one replica's executor (a TorchExecutor in-process, or a Ray actor's
proxy) and applies adapter registrations and removals on the replica's own worker thread,
just before its next step: an executor is never changed while it runs a batch, and an adapter
is registered on a replica before any batch there can use it (the change is queued before the
adapter's name is published). It keeps the replica's adapter sources, so a dead replica can
be rebuilt with them (`restart`: a new TorchExecutor in-process, a new actor on Ray). An
in-process rebuild shares the process: it cures a replica whose state went bad, not a sticky
CUDA error (the process's context is lost; Ray actors are processes of their own).

The scheduler learns of a new adapter by `Cluster.register_adapter` (the caller holds the live
cluster's lock)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.cluster import Cluster
from ..types import Batch, StepResult

log = logging.getLogger(__name__)
Op = Callable[[Any], None]


class ServingExecutor:
    """One replica's executor plus a queue of adapter changes applied between steps."""

    def __init__(self, inner: Any, sources: dict[int, Any] | None = None,
                 rebuild: Callable[[dict[int, Any]], Any] | None = None) -> None:
        self.inner = inner
        self.sources = dict(sources or {})  # adapter id -> source, as registered so far
        self.rebuild = rebuild  # sources -> a new inner executor (in-process restarts)
        self._ops: deque[Op] = deque()
        self._lock = threading.Lock()

    def restart(self) -> None:
        """Replace a dead replica's executor by a fresh one holding the current adapters."""
        restart = getattr(self.inner, "restart", None)
        if restart is not None:  # a Ray actor's proxy restarts its actor
            restart()
            return
        if self.rebuild is None:
            raise RuntimeError("this executor cannot be rebuilt")
        with self._lock:
            sources = dict(self.sources)
        self.inner = None  # free the old weights and KV pool first: two may not fit the device
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.inner = self.rebuild(sources)
        log.warning("replica executor rebuilt with %d adapters", len(sources))

    def enqueue(self, op: Op) -> None:
        with self._lock:
            self._ops.append(op)

    def register_adapter(self, adapter_id: int, source: Any) -> None:
        with self._lock:
            self.sources[adapter_id] = source
        self.enqueue(lambda ex: ex.register_adapter(adapter_id, source))

    def unregister_adapter(self, adapter_id: int) -> None:
        with self._lock:
            self.sources.pop(adapter_id, None)
        self.enqueue(lambda ex: ex.unregister_adapter(adapter_id))

    def apply_pending(self) -> None:
        while True:
            with self._lock:
                if not self._ops:
                    return
                op = self._ops.popleft()
            try:
                op(self.inner)
            except Exception:  # noqa: BLE001  (validated before; log and keep serving)
                log.exception("adapter change failed on an executor")

    def execute(self, batch: Batch) -> StepResult:
        self.apply_pending()
        return self.inner.execute(batch)

    def __getattr__(self, name: str) -> Any:  # export_kv / import_kv / free_request ...
        return getattr(self.inner, name)


def drop_from_devices(cluster: Cluster, adapter_id: int) -> None:
    """Free the adapter's device slot on every replica where nothing uses it (lock held);
    a merged copy is unmerged by the scheduler's next switch."""
    for rep in cluster.replicas:
        rep.drop_adapter(adapter_id)


def torch_serving_executors(folder: Path, sources: dict[int, Any], cluster: Cluster, *,
                            device: str, block_size: int, max_loras: int | None,
                            seed: int, max_cpu_loras: int | None = None) -> list[ServingExecutor]:
    """One in-process TorchExecutor per replica, KV pools sized as the schedulers count;
    `max_cpu_loras` bounds each one's host adapter cache (LRU, as vLLM's --max-cpu-loras)."""
    import os

    import torch

    from ..exec import TorchExecutor

    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(),
                                         (os.cpu_count() or 1) // len(cluster.replicas))))
    out = []
    for rep in cluster.replicas:
        def build(srcs: dict[int, Any], blocks: int = rep.memory.total_blocks) -> Any:
            return TorchExecutor(folder, srcs, device=device, block_size=block_size,
                                 num_kv_blocks=blocks, max_device_adapters=max_loras, seed=seed,
                                 max_host_adapters=max_cpu_loras)
        out.append(ServingExecutor(build(sources), sources, build))
    return out
