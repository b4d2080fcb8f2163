"""The scenario YAML (DESIGN.md section 6): model and profile, cluster, adapters, workload,
policies by registry name, SLO, run options and sweeps. Loaded strictly: unknown keys and bad
values fail before any work with the key path and what is allowed."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import apply_override, load_into, read_yaml_mapping, set_path, spec
from .errors import ConfigError
from .workload import WorkloadConfig, check_workload

PREEMPTION = ("recompute", "swap", "auto")
ADAPTER_MEMORY = ("unified", "static")


@dataclass(frozen=True, slots=True)
class ModelSection:
    profile: str = spec(nonempty=True, doc="latency profile YAML (relative to the scenario)")
    path: str | None = spec(None, doc="Hugging Face model folder (live mode); the demo if unset")
    allow_extrapolation: bool = spec(False, doc="predict outside the profile's measured range")


@dataclass(frozen=True, slots=True)
class ClusterSection:
    replicas: int = spec(1, ge=1)
    max_batch_size: int = spec(16, ge=1, doc="sequences per iteration")
    max_batched_tokens: int = spec(4096, ge=1, doc="tokens per iteration (prefill is chunked)")
    block_size: int = spec(16, ge=1, doc="tokens per KV block")
    max_adapter_slots: int | None = spec(None, ge=1, doc="resident adapters per replica")
    adapter_memory: str = spec("unified", choices=ADAPTER_MEMORY,
                               doc="unified: KV and adapters share one pool; static: fixed split")
    adapter_memory_fraction: float = spec(0.1, gt=0.0, lt=1.0,
                                          doc="static split: share of free memory for adapters")
    memory_fraction: float = spec(1.0, gt=0.0, le=1.0,
                                  doc="share of the memory left after weights used for KV and adapters")
    kv_blocks: int | None = spec(None, ge=1,
                                 doc="KV pool size in blocks of block_size tokens: when set, each replica's "
                                     "pool holds exactly this many blocks whatever the profile's memory "
                                     "(memory_fraction is ignored), e.g. the num_gpu_blocks a vLLM run "
                                     "resolved; resident adapters still take bytes from the pool")
    preemption: str = spec("auto", choices=PREEMPTION)
    prefix_caching: bool = spec(True, doc="keep full prompt KV blocks for reuse, salted by adapter "
                                          "(vLLM's automatic prefix caching, on by default there too)")
    swap_space_bytes: int | None = spec(None, ge=0, doc="host swap per replica (profile's if unset)")
    expected_output_tokens: float = spec(128.0, gt=0.0,
                                         doc="output length assumed before any request finishes")


@dataclass(frozen=True, slots=True)
class AdaptersSection:
    count: int = spec(8, ge=1)
    ranks: tuple[int, ...] = spec((16,), ge=1, nonempty=True, doc="cycled over adapters")
    target_modules: tuple[str, ...] = spec(("q", "k", "v", "o", "gate", "up", "down"), nonempty=True,
                                           choices=("q", "k", "v", "o", "gate", "up", "down"))
    names: tuple[str, ...] | None = spec(None, doc="adapter names (default adapter-<i>)")
    paths: tuple[str, ...] | None = spec(None, doc="PEFT folders (live mode), one per adapter")

    def validate(self, path: str) -> None:
        for key, values in (("names", self.names), ("paths", self.paths)):
            if values is not None and len(values) != self.count:
                raise ConfigError(f"{path}.{key}: must list {self.count} entries (adapters.count), got {len(values)}")
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise ConfigError(f"{path}.names: must be unique")

    def adapter_names(self) -> list[str]:
        return list(self.names) if self.names else [f"adapter-{i}" for i in range(self.count)]


@dataclass(frozen=True, slots=True)
class PolicyRef:
    name: str = spec(nonempty=True)
    params: dict[str, Any] = spec(factory=dict)

    @staticmethod
    def from_string(name: str) -> dict[str, Any]:
        return {"name": name}


@dataclass(frozen=True, slots=True)
class PoliciesSection:
    batching: PolicyRef = field(default_factory=lambda: PolicyRef("unmerged_only"))
    dispatch: PolicyRef = field(default_factory=lambda: PolicyRef("least_loaded"))
    migration: PolicyRef = field(default_factory=lambda: PolicyRef("none"))

    def validate(self, path: str) -> None:
        from .core.registries import check_policies

        check_policies(self, path)


@dataclass(frozen=True, slots=True)
class SloSection:
    latency_per_token_s: float = spec(0.5, gt=0.0, doc="the paper's SLO on average latency per token")
    ttft_s: float | None = spec(None, gt=0.0)


@dataclass(frozen=True, slots=True)
class RunSection:
    horizon_s: float | None = spec(None, gt=0.0, doc="stop simulated time here; unfinished reported")
    fast_path: bool = spec(True, doc="advance identical decode iterations in one event")
    progress: bool = spec(True, doc="progress bar on stderr")


@dataclass(frozen=True, slots=True)
class SweepSection:
    """Vary one field over values and/or run policy variants side by side."""

    parameter: str | None = spec(None, nonempty=True, doc="key path to vary, e.g. workload.arrival.rate_per_s")
    values: tuple[Any, ...] = spec((), doc="values of the parameter")
    variants: dict[str, dict[str, Any]] = spec(factory=dict, doc="name -> {key.path: value} overrides")
    metrics: tuple[str, ...] = spec(("latency_per_token_s.mean", "latency_per_token_s.p90"), nonempty=True,
                                    doc="summary fields to compare, e.g. ttft_s.p90")

    def validate(self, path: str) -> None:
        if self.parameter is not None and not self.values:
            raise ConfigError(f"{path}.values: must list at least one value for {self.parameter}")
        if self.parameter is None and self.values:
            raise ConfigError(f"{path}.parameter: required when values are given")
        if self.parameter is None and not self.variants:
            raise ConfigError(f"{path}: give a parameter with values, or variants, or both")


@dataclass(frozen=True, slots=True)
class Scenario:
    workload: WorkloadConfig
    model: ModelSection
    name: str = "scenario"
    description: str = ""
    seed: int = spec(0, ge=0)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    adapters: AdaptersSection = field(default_factory=AdaptersSection)
    policies: PoliciesSection = field(default_factory=PoliciesSection)
    slo: SloSection = field(default_factory=SloSection)
    run: RunSection = field(default_factory=RunSection)
    sweep: SweepSection | None = None
    base_dir: str = "."  # folder of the scenario file (set by the loader, not by users)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such scenario file")
    return read_yaml_mapping(p, "scenario")


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read, override (`key.path=value`) and validate a scenario file."""
    data = read_yaml(path)
    return scenario_from_dict(data, Path(path).resolve().parent, overrides)


def scenario_from_dict(data: dict[str, Any], base_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    data = copy.deepcopy(data)
    data.pop("base_dir", None)
    policies = data.get("policies")
    if isinstance(policies, dict):  # `batching: credit` is short for `batching: {name: credit}`
        for key, value in policies.items():
            if isinstance(value, str):
                policies[key] = {"name": value}
    for text in overrides:
        apply_override(data, text)
    data["base_dir"] = str(base_dir)
    scenario = load_into(Scenario, data)
    check_workload(scenario.workload, scenario.adapters.adapter_names(), base_dir)
    if scenario.sweep is not None:
        for point in sweep_points(scenario, data):
            load_into(Scenario, point.data)  # every point must be valid before any work
    return scenario


@dataclass(frozen=True, slots=True)
class SweepPoint:
    variant: str
    value: Any
    data: dict[str, Any]


def sweep_points(scenario: Scenario, data: dict[str, Any]) -> list[SweepPoint]:
    """The raw scenario of every (variant, value) pair of a sweep, without the sweep section."""
    sweep = scenario.sweep
    assert sweep is not None
    base = copy.deepcopy(data)
    base.pop("sweep", None)
    variants = sweep.variants or {"": {}}
    values: tuple[Any, ...] = sweep.values if sweep.parameter else (None,)
    points = []
    for name, changes in variants.items():
        for value in values:
            point = copy.deepcopy(base)
            for key, v in changes.items():
                set_path(point, key.split("."), v, f"sweep.variants.{name}.{key}")
            if sweep.parameter:
                set_path(point, sweep.parameter.split("."), value, f"sweep.parameter {sweep.parameter}")
            points.append(SweepPoint(name, value, point))
    return points


def resolve(scenario: Scenario, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(scenario.base_dir) / p
