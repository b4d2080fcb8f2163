"""Where `dlora profile` runs: the model it measures (a folder, the demo, or a shape with random
weights), the device's name and memory, and the host's copy bandwidth."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dlora.errors import ConfigError
from dlora.exec.demo import DEMO_VERSION, ensure_demo
from dlora.exec.loader import parse_config
from dlora.exec.model import FUSED_GROUPS, LlamaModel
from dlora.exec.profile_fit import named_config, random_model
from dlora.profile import Memory


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def copy_bandwidth(device: torch.device, num_bytes: int = 32 << 20, repeats: int = 5) -> float:
    """Bytes per second of a host -> `device` copy (a memcpy on the CPU), median of repeats."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src, device=device)
    times = []
    for _ in range(repeats + 1):
        t = _sync(device)
        dst.copy_(src)
        times.append(_sync(device) - t)
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


def _memory(device: str, model: LlamaModel, device_memory_bytes: int | None) -> tuple[Memory, str]:
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


