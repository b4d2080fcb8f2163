"""Replicas as Ray actors (`dlora run --ray`, `dlora serve --ray [ADDRESS]`).

Each replica's TorchExecutor lives in a Ray actor (one GPU each where the cluster has GPUs,
one CPU otherwise); the server's process keeps the scheduler, the dispatcher and the migrator
and sends each frozen `Batch` to its replica's actor. KV blocks a migration transfers travel
through Ray's object store (`export_kv` on the source actor, `import_kv` on the destination).

Fault tolerance: when an actor dies, its step fails; the live cluster (built with
`max_step_failures=1` on this backend) marks the replica dead and re-dispatches its requests to
live replicas, where they are recomputed and complete. Meanwhile a new actor is started with
the replica's current adapters; when it is ready the replica rejoins the cluster (`revive`).
The server restarts a dead replica's actor through the live cluster's `restart` hook (also
when the actor lives but its steps keep failing: `RayReplica.restart`; the server's side is
`dlora.serve.ray_backend`); `dlora run` lets the proxy restart a dead actor itself
(`auto_restart`). A request's own fault (bad input,
non-finite logits) is caught inside the actor's TorchExecutor and fails that request alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..types import Batch, StepResult

if TYPE_CHECKING:
    from .engine import LiveCluster

log = logging.getLogger(__name__)
RESTART_TIMEOUT_S = 120.0


def init_ray(address: str, num_cpus: int | None = None) -> Any:
    """Connect to Ray (`local`: start a local instance). Raises ConfigError when it cannot."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray: the `ray` package is not installed; `pip install ray`") from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address == "local":
            kwargs["num_cpus"] = num_cpus
        else:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001  (ray raises many kinds)
            raise ConfigError(f"--ray {address}: cannot start or reach Ray ({exc})") from None
    return ray


class ReplicaActor:
    """Body of the Ray actor: one TorchExecutor."""

    def __init__(self, folder: str, sources: dict[int, str], device: str, block_size: int,
                 num_kv_blocks: int, max_loras: int | None, seed: int, threads: int,
                 max_cpu_loras: int | None = None) -> None:
        import torch

        from ..exec import TorchExecutor

        if device == "cpu":
            torch.set_num_threads(threads)
        self.ex = TorchExecutor(folder, sources, device=device, block_size=block_size,
                                num_kv_blocks=num_kv_blocks, max_device_adapters=max_loras, seed=seed,
                                max_host_adapters=max_cpu_loras)

    def ready(self) -> int:
        return os.getpid()

    def execute(self, batch: Batch) -> StepResult:
        return self.ex.execute(batch)

    def register_adapter(self, adapter_id: int, path: str) -> None:
        self.ex.register_adapter(adapter_id, path)

    def unregister_adapter(self, adapter_id: int) -> None:
        self.ex.unregister_adapter(adapter_id)

    def export_kv(self, request_id: int) -> Any:
        return self.ex.export_kv(request_id)

    def import_kv(self, request_id: int, kv: Any) -> None:
        self.ex.import_kv(request_id, kv)


class RayReplica:
    """The driver's proxy of one replica actor (in `dlora serve`, the inner executor of a
    `dlora.serve.replicas.ServingExecutor`)."""

    def __init__(self, replica_id: int, spawn: Callable[[dict[int, str]], Any], sources: dict[int, str]) -> None:
        self.replica_id, self.spawn = replica_id, spawn
        self.sources = dict(sources)  # replayed into a restarted actor
        self.actor = spawn(self.sources)
        self.restarts = 0
        self.on_restarted: Callable[[int], None] | None = None
        self.auto_restart = True  # restart a dead actor here (off: the live cluster's hook does)
        self._restarting = threading.Lock()

    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)

    def execute(self, batch: Batch) -> StepResult:
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        try:
            return self._get(self.actor.execute.remote(batch))
        except RayActorError as exc:
            log.error("replica %d: its Ray actor died (%s)", self.replica_id, type(exc).__name__)
            if self.auto_restart:
                self.restart_in_background()
            return StepResult(time.perf_counter() - t0, error=f"replica actor died: {type(exc).__name__}")

    def register_adapter(self, adapter_id: int, path: str) -> None:
        self.sources[adapter_id] = path
        self._get(self.actor.register_adapter.remote(adapter_id, path))

    def unregister_adapter(self, adapter_id: int) -> None:
        self.sources.pop(adapter_id, None)
        self._get(self.actor.unregister_adapter.remote(adapter_id))

    def export_kv(self, request_id: int) -> Any:
        return self._get(self.actor.export_kv.remote(request_id))

    def import_kv(self, request_id: int, kv: Any) -> None:
        self._get(self.actor.import_kv.remote(request_id, kv))

    def restart(self) -> None:
        """Replace the actor by a new one holding the current adapters (kills the old one if it
        still lives); returns when the new actor is ready. Raises if it cannot start."""
        import ray

        with self._restarting:
            old = self.actor
            with contextlib.suppress(Exception):
                ray.kill(old, no_restart=True)
            actor = self.spawn(dict(self.sources))
            self._get(actor.ready.remote())
            self.actor = actor
            self.restarts += 1
        log.warning("replica %d: actor restarted", self.replica_id)

    def restart_in_background(self) -> None:
        if self._restarting.locked():
            return

        def run() -> None:
            try:
                self.restart()
                if self.on_restarted is not None:
                    self.on_restarted(self.replica_id)
            except Exception:  # noqa: BLE001
                log.exception("replica %d: restarting its actor failed", self.replica_id)

        threading.Thread(target=run, name=f"dlora-ray-restart-{self.replica_id}", daemon=True).start()

    @staticmethod
    def close_backend(executors: list[Any]) -> None:
        """Kill the actors of `executors` (wrappers whose `inner` is a RayReplica)."""
        import ray

        for ex in executors:
            with contextlib.suppress(Exception):
                ray.kill(ex.inner.actor)


def reviver(live: LiveCluster) -> Callable[[int], None]:
    """`revive(i)`: bring replica i back into the cluster (`LiveCluster.revive`) once the failed
    step of its dead actor has evacuated it."""

    def revive(i: int) -> None:
        rep = live.cluster.replicas[i]
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while rep.is_alive and time.monotonic() < deadline:  # the failed step still completing
            time.sleep(0.01)
        live.revive(i)

    return revive




def ray_executor_factory(scenario: Any, address: str = "local") -> Callable[[int], Any]:
    """`executor_factory` for `dlora.live.driver.run` (`dlora run` on Ray): replica id -> a
    proxy of a new actor holding the scenario's model and adapters (the demo when unset).
    A dead actor is restarted; the driver must call `LiveCluster.revive` for the replica to
    rejoin (`proxy.on_restarted`)."""
    from ..build import load_latency, make_adapters, memory_config
    from ..core.memory import MemoryPool
    from .executors import model_source

    latency = load_latency(scenario)
    adapters = make_adapters(scenario, latency)
    src = model_source(scenario, adapters)
    sources = {i: str(p) for i, p in src.adapter_paths.items()}
    blocks = MemoryPool(memory_config(scenario, latency)).total_blocks
    c = scenario.cluster
    ray = init_ray(address, num_cpus=max(c.replicas, os.cpu_count() or 1))
    remote = ray.remote(num_cpus=1)(ReplicaActor)
    threads = max(1, (os.cpu_count() or 1) // c.replicas)

    def make(replica_id: int) -> RayReplica:
        def spawn(srcs: dict[int, str]) -> Any:
            return remote.options(max_restarts=0).remote(
                str(src.folder), srcs, "cpu", c.block_size, blocks, c.max_adapter_slots, scenario.seed, threads)
        proxy = RayReplica(replica_id, spawn, sources)
        ray.get(proxy.actor.ready.remote())
        return proxy

    return make


def ray_run_hooks(scenario: Any, address: str = "local") -> tuple[Callable[[int], Any], Callable[[Any], None]]:
    """(executor_factory, on_created) for `dlora.live.driver.run` on Ray: the factory makes one
    actor proxy per replica; `on_created(live)` makes a restarted actor rejoin its replica."""
    make = ray_executor_factory(scenario, address)
    proxies: list[RayReplica] = []

    def factory(replica_id: int) -> RayReplica:
        proxy = make(replica_id)
        proxies.append(proxy)
        return proxy

    def on_created(live: LiveCluster) -> None:
        revive = reviver(live)
        for proxy in proxies:
            proxy.on_restarted = revive

    return factory, on_created
