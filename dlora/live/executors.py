"""The real executors of a live run and the token ids a replayed workload needs.

`torch_executors` builds one TorchExecutor per replica for the scenario's model folder and
adapters (`model.path`, `adapters.paths`), or the embedded demo (`dlora.exec.demo`) when
`model.path` is unset; each KV pool holds exactly the blocks its replica's scheduler counts.
`prepare_requests` gives workload requests seeded prompt token ids within the vocabulary (a
prefix group's requests share its system prompt's ids) and `ignore_eos` sampling (trace
replay: every request generates its `output_tokens`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.cluster import Cluster
from ..errors import ConfigError, ModelError
from ..scenario import Scenario, resolve
from ..types import Adapter, Executor, Request, SamplingParams

log = logging.getLogger(__name__)
DEMO_VOCAB = 512  # dlora.exec.demo.VOCAB (kept here so scripted runs need no torch)
FIRST_TOKEN = 3  # skip <pad>, <s>, </s>


@dataclass(frozen=True, slots=True)
class ModelSource:
    folder: Path
    adapter_paths: dict[int, Path]  # scenario adapter id -> PEFT folder
    is_demo: bool


@dataclass(frozen=True, slots=True)
class ModelLimits:
    vocab_size: int = DEMO_VOCAB
    max_context_tokens: int | None = None


def model_source(scenario: Scenario, adapters: dict[int, Adapter]) -> ModelSource:
    """Where the model and each adapter come from; the demo is written once when needed."""
    from ..exec.demo import demo_adapter_paths, ensure_demo  # noqa: I001  (imports torch)

    if scenario.model.path is None:
        folder, is_demo = ensure_demo(), True
    else:
        folder = resolve(scenario, scenario.model.path)
        if not folder.is_dir():
            raise ModelError(f"model.path: {folder} is not a folder; give a Hugging Face model folder "
                             "(config.json + *.safetensors), or remove model.path to use the embedded demo")
        is_demo = (folder / "dlora_demo.json").is_file()
    if all(a.path is not None for a in adapters.values()):
        return ModelSource(folder, {i: Path(a.path) for i, a in adapters.items() if a.path}, is_demo)
    if not is_demo:
        raise ConfigError("adapters.paths: required in live mode when model.path names a model folder "
                          "(one PEFT folder per adapter)")
    demo = demo_adapter_paths(folder)
    if len(adapters) > len(demo):
        log.warning("the scenario has %d adapters and the demo %d: cycling the demo adapters",
                    len(adapters), len(demo))
    return ModelSource(folder, {i: demo[i % len(demo)] for i in adapters}, is_demo)


def torch_executors(scenario: Scenario, cluster: Cluster, adapters: dict[int, Adapter],
                    device: str | None = None) -> tuple[list[Executor], ModelLimits]:
    """One TorchExecutor per replica (built now, so a bad folder fails before the run)."""
    import torch

    from ..exec import TorchExecutor

    src = model_source(scenario, adapters)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        threads = max(1, (os.cpu_count() or 1) // len(cluster.replicas))
        if torch.get_num_threads() > threads:
            log.info("torch intra-op threads %d -> %d (one share of the cores per replica)",
                     torch.get_num_threads(), threads)
            torch.set_num_threads(threads)
    c = scenario.cluster
    executors: list[Executor] = []
    for rep in cluster.replicas:
        ex = TorchExecutor(src.folder, src.adapter_paths, device=device, block_size=c.block_size,
                           num_kv_blocks=rep.memory.total_blocks, max_device_adapters=c.max_adapter_slots,
                           seed=scenario.seed)
        if ex.adapter_errors:
            problem = next(iter(ex.adapter_errors.values()))
            raise ConfigError(f"adapters.paths: {len(ex.adapter_errors)} adapter(s) cannot be used: {problem}")
        executors.append(ex)
    first: Any = executors[0]
    cfg = first.model.config
    _check_ranks(first, adapters)
    log.info("live: %d replicas of %s on %s (%s), %d KV blocks each", len(executors), src.folder,
             device, "demo" if src.is_demo else "model folder", cluster.replicas[0].memory.total_blocks)
    return executors, ModelLimits(cfg.vocab_size, cfg.max_positions)


def _check_ranks(executor: Any, adapters: dict[int, Adapter]) -> None:
    for i, a in adapters.items():
        real = executor._host_adapter(i).rank
        if real != a.rank:
            log.warning("adapter %s: the scenario says rank %d, its folder rank %d (memory "
                        "accounting and predictions use the scenario's)", a.name, a.rank, real)


def prompt_token_ids(seed: int, request_id: int, length: int, vocab_size: int = DEMO_VOCAB) -> tuple[int, ...]:
    """Seeded token ids for a replayed request (no special tokens)."""
    rng = np.random.default_rng((seed, request_id))
    return tuple(int(t) for t in rng.integers(FIRST_TOKEN, vocab_size, size=length))


def prefix_token_ids(seed: int, group: int, length: int, vocab_size: int = DEMO_VOCAB) -> tuple[int, ...]:
    """Seeded token ids of a prefix group's shared system prompt (`Request.prefix_group`)."""
    rng = np.random.default_rng((seed, 0x5EED, group + 1))  # groups are >= -1
    return tuple(int(t) for t in rng.integers(FIRST_TOKEN, vocab_size, size=length))


def prepare_requests(requests: list[Request], seed: int, vocab_size: int = DEMO_VOCAB) -> None:
    """Give workload requests prompt token ids and trace-replay sampling (in place). Requests
    of a prefix group start with the group's `prefix_tokens` ids (the same for the whole
    group), so the executor's token-id block hashes share exactly the blocks the simulator's
    group hashes share (`dlora.core.prefix`)."""
    longest: dict[int, int] = {}
    for r in requests:
        if r.prompt_token_ids is None and r.prefix_group is not None and r.prefix_tokens > 0:
            longest[r.prefix_group] = max(longest.get(r.prefix_group, 0), r.prefix_tokens)
    prefixes = {g: prefix_token_ids(seed, g, n, vocab_size) for g, n in longest.items()}
    for r in requests:
        if r.prompt_token_ids is None:
            ids = prompt_token_ids(seed, r.id, r.prompt_tokens, vocab_size)
            if r.prefix_group in prefixes:
                k = min(r.prefix_tokens, r.prompt_tokens)
                ids = prefixes[r.prefix_group][:k] + ids[k:]
            r.prompt_token_ids = ids
        if r.sampling is None:
            r.sampling = SamplingParams(ignore_eos=True)
