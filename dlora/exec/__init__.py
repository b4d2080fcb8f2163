"""The real executor: Llama-family model, paged KV cache, PEFT adapters, TorchExecutor.

Imports torch; nothing outside `dlora.exec`, `dlora.kernels` and `dlora.live` may import it.
"""

from __future__ import annotations

from dlora.exec.adapters import LoraAdapter, LoraModule, load_adapter
from dlora.exec.demo import demo_adapter_paths, ensure_demo, write_demo
from dlora.exec.executor import TorchExecutor
from dlora.exec.loader import LlamaConfig, load_model_folder
from dlora.exec.model import LlamaModel

__all__ = [
    "LlamaConfig",
    "LlamaModel",
    "LoraAdapter",
    "LoraModule",
    "TorchExecutor",
    "demo_adapter_paths",
    "ensure_demo",
    "load_adapter",
    "load_model_folder",
    "write_demo",
]
