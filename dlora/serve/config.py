"""`dlora serve`'s options (`ServeConfig`) and the scenario they stand for.

The server runs the same scheduler objects as `simulate` and `run` (dlora.build.make_cluster):
its options are translated into a `Scenario` whose cluster and policies sections they fill.
The latency profile only feeds the policies' estimates and the KV capacity; the tiny CPU
profile under `profiles/` is the default (a measured one is preferred when present)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..scenario import Scenario, scenario_from_dict

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"
DEFAULT_PROFILES = ("cpu-tiny-demo.yaml", "cpu-tiny.yaml", "cpu-tiny-synthetic.yaml")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """What `dlora serve` was asked for (vLLM's option names where the concept is the same)."""

    model: str | None = None  # Hugging Face Llama folder; None: the embedded demo
    served_model_name: str | None = None  # the base model's name in the API (default: folder name)
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, PEFT folder); demo adapters if unset
    max_loras: int | None = 4  # adapter slots on the device, per replica (vLLM's default: 1)
    max_lora_rank: int = 64  # a larger adapter is refused at load (vLLM's default: 16)
    max_cpu_loras: int | None = None  # host copies per replica, an LRU cache (vLLM: = max_loras); None: all
    replicas: int = 1
    policy: str = "credit"  # batching policy (registry name)
    dispatch: str = "least_loaded"
    migration: str = "none"
    max_queue: int = 256  # unfinished requests admitted before 429
    max_batch_size: int = 16
    max_batched_tokens: int = 512
    block_size: int = 16
    memory_fraction: float = 0.01  # of the profile's KV memory; 0.01 of the tiny CPU profile ~ 4.5k tokens
    profile: str | None = None
    device: str | None = None  # cpu | cuda (default: cuda when available)
    ray_address: str | None = None  # set: replicas are Ray actors ("local" starts a local Ray)
    max_step_failures: int = 3
    seed: int = 0
    api_key: str | None = None  # set: every /v1 route needs `Authorization: Bearer <key>`
    allow_runtime_lora: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM: off)
    allowed_adapter_roots: tuple[str, ...] = ()  # set: runtime loads only from under these folders

    def __post_init__(self) -> None:
        for name in ("replicas", "max_queue", "max_lora_rank", "max_batch_size", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.max_loras is not None and self.max_loras < 1:
            raise ConfigError("--max-loras: must be at least 1")
        if self.max_cpu_loras is not None:
            if self.max_cpu_loras < 1:
                raise ConfigError("--max-cpu-loras: must be at least 1")
            if self.max_loras is not None and self.max_cpu_loras < self.max_loras:
                raise ConfigError(f"--max-cpu-loras ({self.max_cpu_loras}) must be at least "
                                  f"--max-loras ({self.max_loras}), as in vLLM")
        names = [n for n, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ConfigError("--lora-modules: adapter names must be unique")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key: empty; give a key, or leave the option (and "
                              "DLORA_API_KEY / VLLM_API_KEY) unset for an open server")
        for root in self.allowed_adapter_roots:
            if not Path(root).expanduser().is_dir():
                raise ConfigError(f"--allowed-adapter-root {root}: not a folder")


def parse_lora_modules(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """`name=path` items (vLLM's --lora-modules form; a JSON object {"name","path"} also works)."""
    import json

    out: list[tuple[str, str]] = []
    for item in items or []:
        if item.lstrip().startswith("{"):
            try:
                d = json.loads(item)
                out.append((str(d["name"]), str(d["path"])))
                continue
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--lora-modules: {item!r} is not {{\"name\": ..., \"path\": ...}}") from None
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora-modules: {item!r} is not name=path")
        out.append((name, path))
    return tuple(out)


def default_profile() -> Path:
    for name in DEFAULT_PROFILES:
        p = PROFILES_DIR / name
        if p.is_file():
            return p
    raise ConfigError(f"no CPU profile found under {PROFILES_DIR}; pass --profile PATH")


def serve_scenario(cfg: ServeConfig) -> Scenario:
    """The scenario `cfg` stands for (its workload is unused: requests come over HTTP)."""
    profile = Path(cfg.profile).resolve() if cfg.profile else default_profile()
    data: dict[str, Any] = {
        "name": "serve",
        "seed": cfg.seed,
        "model": {"profile": str(profile), "allow_extrapolation": True},
        "cluster": {
            "replicas": cfg.replicas, "max_batch_size": cfg.max_batch_size,
            "max_batched_tokens": cfg.max_batched_tokens, "block_size": cfg.block_size,
            "max_adapter_slots": cfg.max_loras, "memory_fraction": cfg.memory_fraction,
        },
        "workload": {"num_requests": 1, "arrival": {"kind": "poisson", "rate_per_s": 1.0},
                     "lengths": {"kind": "fixed", "prompt_tokens": 1, "output_tokens": 1}},
        "policies": {"batching": cfg.policy, "dispatch": cfg.dispatch, "migration": cfg.migration},
        "run": {"progress": False},
    }
    return scenario_from_dict(data, Path.cwd())
