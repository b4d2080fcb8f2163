"""The server's side of Ray replicas (`dlora serve --ray [ADDRESS]`): one actor per replica
(`dlora.live.ray_replicas`), a GPU each where the Ray cluster has them, each wrapped in a
`ServingExecutor` for run-time adapter changes; the live cluster's restart hook restarts a dead
actor (`auto_restart` off)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..core.cluster import Cluster
from ..live.ray_replicas import RayReplica, ReplicaActor, init_ray
from .config import ServeConfig
from .replicas import ServingExecutor

log = logging.getLogger(__name__)


def ray_serving_executors(cfg: ServeConfig, folder: Path, sources: dict[int, str],
                          cluster: Cluster) -> list[ServingExecutor]:
    """One actor per replica, KV pools sized as the schedulers count."""
    n = len(cluster.replicas)
    ray = init_ray(cfg.ray_address or "local", num_cpus=max(n, os.cpu_count() or 1))
    gpus = ray.cluster_resources().get("GPU", 0) if cfg.device != "cpu" else 0
    device = "cuda" if gpus >= 1 else "cpu"
    threads = max(1, (os.cpu_count() or 1) // n)
    remote = ray.remote(num_gpus=1, num_cpus=0)(ReplicaActor) if device == "cuda" else \
        ray.remote(num_cpus=1)(ReplicaActor)
    out = []
    for rep in cluster.replicas:
        def spawn(srcs: dict[int, str], blocks: int = rep.memory.total_blocks) -> Any:
            return remote.options(max_restarts=0).remote(
                str(folder), srcs, device, cfg.block_size, blocks, cfg.max_loras, cfg.seed, threads,
                cfg.max_cpu_loras)
        proxy = RayReplica(rep.id, spawn, sources)
        proxy.auto_restart = False  # the live cluster's restart hook restarts it (engine.py)
        out.append(ServingExecutor(proxy, sources))
    refs = [ex.inner.actor.ready.remote() for ex in out]
    ray.get(refs)  # fail now, not at the first request, if an actor cannot start
    log.info("ray: %d replica actors on %s", n, device)
    return out
