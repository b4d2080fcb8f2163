"""Facts an imported profile needs that its source files do not carry: the real shape of a
known model (a layer-wise profile is measured on a shrunk copy) and what is known about a
GPU (memory, interconnect, host link). Each entry names where its numbers come from; anything
not listed must be given on the command line (`--config`, `--device-memory-gib`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProfileError
from ..profile import ModelShape

# Hugging Face config.json of each model: (layers, hidden, heads, kv heads, head_dim (0 =
# hidden / heads), intermediate, vocab, max positions).
KNOWN_MODELS: dict[str, tuple[int, int, int, int, int, int, int, int]] = {
    "meta-llama/Llama-3.1-8B": (32, 4096, 32, 8, 0, 14336, 128256, 131072),
    "Qwen/Qwen3-32B": (64, 5120, 64, 8, 128, 25600, 151936, 40960),
    "meta-llama/Llama-2-7b-hf": (32, 4096, 32, 32, 0, 11008, 32000, 4096),
    "meta-llama/Llama-2-13b-hf": (40, 5120, 40, 40, 0, 13824, 32000, 4096),
    "meta-llama/Llama-2-70b-hf": (80, 8192, 64, 8, 0, 28672, 32000, 4096),
}


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU model. `allreduce_*`: a two-GPU NCCL all-reduce of `b` bytes takes
    `allreduce_fixed_s + b / allreduce_bytes_per_s`; `host_bytes_per_s`: pinned host <-> device."""

    name: str
    memory_gib: float
    allreduce_fixed_s: float
    allreduce_bytes_per_s: float
    host_bytes_per_s: float
    source: str


KNOWN_GPUS: dict[str, Gpu] = {
    # memory: CUDA's total (mem_get_info) as LLMServingSim's hardware.yaml records it (96 GB
    # nominal); all-reduce: an affine fit (ours; mean error 3.4%, max 13%) to the 24 NCCL
    # all_reduce samples, 4 KiB-20 MiB, two GPUs one hop, in the same file; host link: PCIe 5.0
    # x16, 63 GB/s raw per direction, assumed 50 GB/s for pinned copies (not measured).
    "RTXPRO6000": Gpu(
        name="NVIDIA RTX PRO 6000 Blackwell Server Edition", memory_gib=94.97,
        allreduce_fixed_s=20e-6, allreduce_bytes_per_s=16e9, host_bytes_per_s=50e9,
        source="LLMServingSim (MIT) profiler/perf/RTXPRO6000/hardware.yaml: memory_total_gib "
               "94.97; all-reduce: the interconnect LLMServingSim configures for this machine "
               "(bench/examples/RTXPRO6000/*/config.json: link_bw 16 GB/s, link_latency 20 us; "
               "github.com/casys-kaist/LLMServingSim), no NVLink. Its NCCL micro-benchmark in "
               "hardware.yaml (2 GPUs) fits 13.3 us + bytes / 36.9 GB/s, about half of what the "
               "all-reduces of a real vLLM TP-2 run cost; override with --link-gbps / "
               "--link-latency-us. PCIe 5.0 x16 host link, 50 GB/s pinned assumed"),
}


def known_shape(model: str, dtype_bytes: int, tensor_parallel: int) -> ModelShape:
    """The whole-model shape of `model` from the table above."""
    if model not in KNOWN_MODELS:
        raise ProfileError(f"model {model!r} has no built-in shape (known: {', '.join(KNOWN_MODELS)}); "
                           "pass --config PATH to its Hugging Face config.json")
    layers, hidden, heads, kv, head_dim, inter, vocab, positions = KNOWN_MODELS[model]
    return ModelShape(name=model, num_layers=layers, hidden_size=hidden, num_heads=heads,
                      num_kv_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      dtype_bytes=dtype_bytes, max_context_tokens=positions,
                      tensor_parallel=tensor_parallel,
                      head_dim_override=head_dim if head_dim and head_dim * heads != hidden else 0)


def config_shape(path: Path, model: str, dtype_bytes: int, tensor_parallel: int) -> ModelShape:
    """The shape in a Hugging Face config.json (a file, or a folder holding one)."""
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except OSError:
        raise ProfileError(f"--config {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"--config {file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in keys if not isinstance(cfg.get(k), int)]
    if missing:
        raise ProfileError(f"--config {file}: missing or non-integer {', '.join(missing)}")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    return ModelShape(name=model, num_layers=cfg["num_hidden_layers"], hidden_size=hidden,
                      num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                      intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                      dtype_bytes=dtype_bytes,
                      max_context_tokens=cfg.get("max_position_embeddings") or 4096,
                      tensor_parallel=tensor_parallel,
                      head_dim_override=head_dim if head_dim * heads != hidden else 0)


def known_gpu(hardware: str) -> Gpu | None:
    return KNOWN_GPUS.get(hardware)
