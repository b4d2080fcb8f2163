"""PEFT LoRA adapter folders: read, validate against the base model, hold on the host.

A folder holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules, rank_pattern,
alpha_pattern) and `adapter_model.safetensors` with keys like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. Every problem is an
`AdapterError` naming the adapter, the module and what is wrong; one bad adapter never stops
the others from loading. Scale per module: alpha / r, or alpha / sqrt(r) with rsLoRA
(PAPER.md section 1).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlora.errors import AdapterError
from dlora.exec.loader import LlamaConfig
from dlora.exec.model import ATTN_MODULES, TARGET_MODULES

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\."
    r"(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, slots=True)
class LoraModule:
    """One target projection of one layer: delta W = scale * b @ a."""

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A validated adapter held in host memory (CPU tensors in the model's dtype)."""

    name: str
    rank: int  # the config's r (per-module ranks may differ via rank_pattern)
    target_modules: tuple[str, ...]  # among TARGET_MODULES
    modules: dict[tuple[int, str], LoraModule] = field(repr=False)
    path: str | None = None

    @property
    def size_bytes(self) -> int:
        return sum(
            m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
            for m in self.modules.values()
        )


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's matching rule for rank_pattern / alpha_pattern keys."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _targets(name: str, raw: Any, cfg: LlamaConfig) -> tuple[str, ...]:
    if isinstance(raw, str):  # a regex over full module names, as PEFT allows
        names = [
            f"model.layers.{i}.{'self_attn' if m in ATTN_MODULES else 'mlp'}.{m}"
            for i in range(cfg.num_layers)
            for m in TARGET_MODULES
        ]
        found = {n.rsplit(".", 1)[1] for n in names if re.fullmatch(raw, n)}
        if not found:
            raise AdapterError(
                f"adapter {name!r}: target_modules regex {raw!r} matches no "
                f"projection of the base model"
            )
        return tuple(m for m in TARGET_MODULES if m in found)
    if not isinstance(raw, list | tuple) or not raw:
        raise AdapterError(f"adapter {name!r}: target_modules must be a non-empty list")
    unknown = [m for m in raw if m not in TARGET_MODULES]
    if unknown:
        raise AdapterError(
            f"adapter {name!r}: module(s) {unknown} are not supported targets "
            f"(supported: {', '.join(TARGET_MODULES)})"
        )
    return tuple(m for m in TARGET_MODULES if m in raw)


def _read_config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise AdapterError(
            f"adapter {name!r}: {path} is missing; a PEFT adapter folder needs adapter_config.json"
        ) from e
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise AdapterError(f"adapter {name!r}: {path} must hold a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {raw['peft_type']!r} is not LORA")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if raw.get(key) == bad:
            raise AdapterError(f"adapter {name!r}: {key}=true is not supported")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r}: LoRA bias and modules_to_save are not supported")
    return raw


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.exists():
        hint = (
            " (only adapter_model.bin found: convert it to safetensors)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterError(f"adapter {name!r}: {path} is missing{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"adapter {name!r}: {path} is corrupt or truncated ({e})") from e


def load_adapter(
    path: str | Path,
    config: LlamaConfig,
    *,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """Read and validate a PEFT LoRA folder against the base model `config`."""
    folder = Path(path)
    name = name or folder.name
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: folder {folder} does not exist")
    raw = _read_config(folder, name)
    try:
        r = int(raw["r"])
        alpha = float(raw.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: adapter_config.json needs an integer r ({e})") from e
    if r < 1:
        raise AdapterError(f"adapter {name!r}: r must be at least 1, got {r}")
    rslora = bool(raw.get("use_rslora", False))
    rank_pattern = dict(raw.get("rank_pattern") or {})
    alpha_pattern = dict(raw.get("alpha_pattern") or {})
    targets = _targets(name, raw.get("target_modules"), config)
    tensors = _read_tensors(folder, name)

    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} is not a LoRA weight of a "
                "Llama projection (embeddings, lm_head and biases are unsupported)"
            )
        layer, module, which = int(m.group(1)), m.group(3), m.group(4)
        if module not in TARGET_MODULES or module not in targets:
            raise AdapterError(
                f"adapter {name!r}: module {module!r} in {key!r} is not among "
                f"its target_modules {list(targets)}"
            )
        if layer >= config.num_layers:
            raise AdapterError(
                f"adapter {name!r}: {key!r} names layer {layer} but the base "
                f"model has {config.num_layers} layers"
            )
        found.setdefault((layer, module), {})[which] = t

    modules: dict[tuple[int, str], LoraModule] = {}
    for layer in range(config.num_layers):
        for module in targets:
            where = f"adapter {name!r}, layer {layer} {module}"
            pair = found.get((layer, module), {})
            for which in ("A", "B"):
                if which not in pair:
                    raise AdapterError(
                        f"{where}: lora_{which} weight is missing from adapter_model.safetensors"
                    )
            full = f"model.layers.{layer}.{'self_attn' if module in ATTN_MODULES else 'mlp'}."
            full += module
            rk = _pattern_key(rank_pattern, full)
            ak = _pattern_key(alpha_pattern, full)
            mr = int(rank_pattern[rk]) if rk else r
            ma = float(alpha_pattern[ak]) if ak else alpha
            d_out, d_in = config.module_shape(module)
            a, b = pair["A"], pair["B"]
            for which, t, shape in (("lora_A", a, (mr, d_in)), ("lora_B", b, (d_out, mr))):
                if t.dtype not in _FLOAT_DTYPES:
                    raise AdapterError(
                        f"{where}: {which} has dtype {t.dtype}, expected a floating-point dtype"
                    )
                if tuple(t.shape) != shape:
                    raise AdapterError(
                        f"{where}: {which} has shape {tuple(t.shape)}, the base "
                        f"model and rank {mr} need {shape}"
                    )
                if not torch.isfinite(t).all():
                    raise AdapterError(f"{where}: {which} contains NaN or Inf values")
            scale = ma / math.sqrt(mr) if rslora else ma / mr
            modules[(layer, module)] = LoraModule(
                a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=scale
            )
    return LoraAdapter(name=name, rank=r, target_modules=targets, modules=modules, path=str(folder))
