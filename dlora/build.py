"""Build the core objects of a scenario (adapters, memory pools, policies, replicas, cluster).

Both drivers call this, so `simulate` and `run` use the same scheduler objects."""

from __future__ import annotations

from .core.baselines import PeftParams
from .core.batching import BATCH_POLICIES
from .core.cluster import Cluster
from .core.context import AdapterCatalog, DispatchContext, PolicyContext, ReplicaConfig
from .core.dispatch import DISPATCHERS
from .core.memory import MemoryConfig, MemoryPool
from .core.migration import MIGRATORS, Migrator
from .core.registries import REGISTRIES  # noqa: F401  (loads every policy)
from .core.replica import ReplicaScheduler
from .core.work import OutputLengthEstimate, WorkEstimator
from .latency import LatencyModel
from .profile import load_profile
from .scenario import Scenario, resolve
from .types import Adapter


def load_latency(scenario: Scenario) -> LatencyModel:
    """The scenario's latency model; a baseline batching policy (`vllm`, `peft`) is priced by
    the profile's `baselines` entry for it when there is one, and `peft` with `static_batches`
    pays the padding of its static batches (profile.py)."""
    profile = load_profile(resolve(scenario, scenario.model.profile))
    ref = scenario.policies.batching
    params = BATCH_POLICIES.check(ref.name, ref.params, "policies.batching")
    static = isinstance(params, PeftParams) and params.static_batches
    return LatencyModel(profile, allow_extrapolation=scenario.model.allow_extrapolation,
                        baseline=ref.name, static_batches=static)


def make_adapters(scenario: Scenario, latency: LatencyModel) -> dict[int, Adapter]:
    sec = scenario.adapters
    names = sec.adapter_names()
    out = {}
    for i, name in enumerate(names):
        rank = sec.ranks[i % len(sec.ranks)]
        size = latency.model.adapter_bytes(rank, sec.target_modules)  # whole: memory is per replica
        path = str(resolve(scenario, sec.paths[i])) if sec.paths else None
        out[i] = Adapter(i, name, rank, size, sec.target_modules, path)
    return out


def memory_config(scenario: Scenario, latency: LatencyModel, prefix_caching: bool = False) -> MemoryConfig:
    """The replicas' memory pool. `prefix_caching` is the driver's to turn on: `simulate` and
    `run` follow `cluster.prefix_caching`, `serve` its --enable-prefix-caching flag (the live
    executor shares KV blocks as this pool counts them: `dlora.exec.kv_cache`)."""
    c = scenario.cluster
    tp = latency.model.tensor_parallel
    block_bytes = c.block_size * latency.kv_bytes_per_token
    if c.kv_blocks is not None:  # an exact block count (e.g. what a real engine resolved)
        capacity = c.kv_blocks * block_bytes
    else:
        capacity = int(latency.kv_capacity_bytes() * c.memory_fraction)
    swap = c.swap_space_bytes if c.swap_space_bytes is not None else latency.profile.memory.host_swap_bytes
    budget = int(capacity * c.adapter_memory_fraction) if c.adapter_memory == "static" else None
    del tp  # memory figures in a profile are per replica (all its devices together)
    return MemoryConfig(
        capacity_bytes=capacity, block_tokens=c.block_size, block_bytes=block_bytes,
        max_adapter_slots=c.max_adapter_slots, adapter_budget_bytes=budget, swap_capacity_bytes=swap,
        prefix_caching=prefix_caching,
    )


def make_cluster(scenario: Scenario, latency: LatencyModel, adapters: dict[int, Adapter],
                 prefix_caching: bool = False) -> tuple[Cluster, Migrator]:
    c = scenario.cluster
    p = scenario.policies
    lengths = OutputLengthEstimate(prior=c.expected_output_tokens)
    catalog = AdapterCatalog(adapters)
    rconf = ReplicaConfig(c.max_batch_size, c.max_batched_tokens, c.preemption)
    mconf = memory_config(scenario, latency, prefix_caching)
    replicas = []
    for i in range(c.replicas):
        ctx = PolicyContext(latency, catalog.ranks, rconf, i)
        policy = BATCH_POLICIES.create(p.batching.name, p.batching.params, "policies.batching", ctx)
        work = WorkEstimator(latency, rconf, lengths)
        replicas.append(ReplicaScheduler(i, rconf, MemoryPool(mconf), policy, latency, catalog, work))
    dctx = DispatchContext(latency, catalog, c.replicas, scenario.seed, rconf, mconf)
    dispatcher = DISPATCHERS.create(p.dispatch.name, p.dispatch.params, "policies.dispatch", dctx)
    migrator = MIGRATORS.create(p.migration.name, p.migration.params, "policies.migration", dctx)
    cluster = Cluster(replicas, dispatcher, lengths, catalog)
    migrator.bind(cluster)  # a migrator that reads per-request snapshots keeps it
    return cluster, migrator


def check_scenario(scenario: Scenario) -> None:
    """What needs the profile, checked before any work (at every point of a sweep): each
    adapter fits a replica beside one KV block, and within the static adapter budget. Raises
    ConfigError naming the key path (`adapters.ranks[i]`)."""
    from pathlib import Path

    from .config import to_plain
    from .scenario import scenario_from_dict, sweep_points

    if scenario.sweep is None:
        _check_adapters_fit(scenario, load_latency(scenario), "")
        return
    raw = to_plain(scenario)
    raw.pop("base_dir", None)
    for point in sweep_points(scenario, raw):
        sc = scenario_from_dict(point.data, Path(scenario.base_dir))
        label = " ".join(str(p) for p in (point.variant, point.value) if p not in ("", None))
        _check_adapters_fit(sc, load_latency(sc), f"sweep point {label}: " if label else "")


def _check_adapters_fit(scenario: Scenario, latency: LatencyModel, where: str) -> None:
    from .errors import ConfigError

    mconf = memory_config(scenario, latency)
    ranks = scenario.adapters.ranks
    for adapter in make_adapters(scenario, latency).values():
        key = f"{where}adapters.ranks[{adapter.id % len(ranks)}]"
        size = adapter.size_bytes
        budget = mconf.adapter_budget_bytes
        if budget is not None and size > budget:
            raise ConfigError(
                f"{key}: rank {adapter.rank} makes adapters of {size:,} bytes, more than a replica's "
                f"static adapter budget of {budget:,} bytes (cluster.adapter_memory_fraction); "
                "lower the rank or raise the budget")
        if size + mconf.block_bytes > mconf.capacity_bytes:
            raise ConfigError(
                f"{key}: rank {adapter.rank} makes adapters of {size:,} bytes, but a replica holds "
                f"{mconf.capacity_bytes:,} bytes for adapters and KV cache together, so no request "
                "of this adapter could ever run; lower the rank, use fewer target_modules, or give "
                "replicas more memory")
