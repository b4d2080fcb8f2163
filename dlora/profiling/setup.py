"""Where `dlora profile` runs: the model it measures (a folder, the demo, or a named or
config.json shape with random weights), the device's name and memory, the host's copy bandwidth,
and `ProfileSetup` (what the profile says about all of it). Imports torch (the measuring side)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..exec.demo import DEMO_VERSION, ensure_demo
from ..exec.loader import LlamaConfig, parse_config
from ..exec.model import FUSED_GROUPS, LlamaModel
from ..profile import Memory

# Llama-2 shapes (Hugging Face config.json of meta-llama/Llama-2-*-hf); `demo` is the embedded
# tiny model (dlora.exec.demo) for tests.
NAMED_CONFIGS: dict[str, tuple[str, int, int, int, int, int, int]] = {
    # name: (model id, layers, hidden, heads, kv heads, intermediate, vocab)
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", 40, 5120, 40, 40, 13824, 32000),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 32000),
    "demo": ("dlora-demo-shape", 2, 64, 4, 2, 176, 512),
}


@dataclass(frozen=True, slots=True)
class ProfileSetup:
    """What the profile says about where it was measured."""

    model_name: str
    device_name: str
    config: LlamaConfig
    dtype: torch.dtype
    adapter_ranks: dict[int, int]  # sweep adapter id -> rank
    memory: Memory
    command: str = ""
    notes: str = ""


def named_config(name: str) -> tuple[str, LlamaConfig]:
    if name not in NAMED_CONFIGS:
        raise ConfigError(f"--model-config {name!r} is unknown (known: {', '.join(NAMED_CONFIGS)})")
    model_id, layers, hidden, heads, kv, inter, vocab = NAMED_CONFIGS[name]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_positions=4096,
                      eos_token_ids=(2,), bos_token_id=1)
    return model_id, cfg


class RandomWeights(dict):
    """Weights of `cfg`'s shapes made on demand (seeded), so a large model is never held twice
    while `LlamaModel` fuses its projections."""

    def __init__(self, cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        self.shapes: dict[str, tuple[int, ...]] = {
            "embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
            "lm_head.weight": (cfg.vocab_size, cfg.hidden_size), "norm.weight": (cfg.hidden_size,)}
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self.shapes[f"{p}{norm}.weight"] = (cfg.hidden_size,)
            for members in FUSED_GROUPS.values():
                for m in members:
                    group = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                    self.shapes[f"{p}{group}.{m}.weight"] = cfg.module_shape(m)
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        std = 1.0 if name.startswith("embed") else shape[1] ** -0.5
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return (t * std).to(self.dtype)


def random_model(cfg: LlamaConfig, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaModel:
    return LlamaModel(cfg, RandomWeights(cfg, torch.device(device), dtype, seed), device)


def sync(device: torch.device) -> float:
    """Wait for `device`'s queued work; then `time.perf_counter()`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def copy_bandwidth(device: torch.device, num_bytes: int = 32 << 20, repeats: int = 5) -> float:
    """Bytes per second of a host -> `device` copy (a memcpy on the CPU), median of repeats."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src, device=device)
    times = []
    for _ in range(repeats + 1):
        t = sync(device)
        dst.copy_(src)
        times.append(sync(device) - t)
    return num_bytes / statistics.median(times[1:])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu: {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def load_model(model_dir: str | Path | None, model_config: str | None, dummy_weights: bool,
               device: str, dtype: torch.dtype | None, seed: int = 0) -> tuple[str, LlamaModel]:
    """(model name, model): a folder (the embedded demo by default), or a named / config.json
    shape with random weights (`dummy_weights`)."""
    if model_config is not None:
        if not dummy_weights:
            raise ConfigError("--model-config gives only a shape; add --dummy-weights to profile it "
                              "with random weights (or pass --model DIR with real weights)")
        if Path(model_config).exists():
            cfg_path = Path(model_config)
            cfg = parse_config(cfg_path if cfg_path.is_dir() else cfg_path.parent)
            name = cfg_path.resolve().parent.name if cfg_path.is_file() else cfg_path.name
        else:
            name, cfg = named_config(model_config)
        dt = dtype or (torch.float16 if device == "cuda" else torch.float32)
        return f"{name} (random weights)", random_model(cfg, device, dt, seed)
    is_demo = model_dir is None
    folder = ensure_demo() if model_dir is None else Path(model_dir)
    if dummy_weights:
        cfg = parse_config(folder)
        own: torch.dtype = dtype or getattr(torch, str(cfg.dtype), None) or torch.float32
        return f"{folder.name} (random weights)", random_model(cfg, device, own, seed)
    name = f"dlora-demo v{DEMO_VERSION} (tiny random Llama)" if is_demo else folder.name
    return name, LlamaModel.from_folder(folder, device=device, dtype=dtype)


def memory_budget(device: str, model: LlamaModel, device_memory_bytes: int | None) -> tuple[Memory, str]:
    """The profile's memory (the device's total on CUDA, a chosen budget on the CPU) and a note
    saying which."""
    weights = sum(t.numel() * t.element_size() for t in _weights(model))
    if device == "cuda":
        total = device_memory_bytes or torch.cuda.get_device_properties(0).total_memory
        return (Memory(total, total // 10, 64 << 30),
                "memory: the device's total, 10% reserved (vLLM's gpu_memory_utilization 0.9); "
                "64 GiB host swap assumed.")
    total = device_memory_bytes or max(256 << 20, 2 * weights + (64 << 20))
    return (Memory(total, 32 << 20, total),
            f"memory: a chosen CPU budget of {total >> 20} MiB (32 MiB reserved), not a measurement.")


def _weights(model: LlamaModel) -> list[torch.Tensor]:
    ts = [model.embed, model.norm] + ([] if model.lm_head is model.embed else [model.lm_head])
    for layer in model.layers:
        ts += [layer["input_norm"], layer["post_norm"], *(layer[g] for g in FUSED_GROUPS)]
    return ts
