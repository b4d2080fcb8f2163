"""PEFT LoRA adapter folders: read, validate against the base model, hold on the host.

A folder holds `adapter_config.json` and `adapter_model.safetensors` with keys like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. Every problem is an
`AdapterError` naming the adapter, the module and what is wrong; one bad adapter never stops
the others from loading. Scale per module: alpha / r, or alpha / sqrt(r) with rsLoRA
(PAPER.md section 1).

Which projections an adapter adapts is decided as PEFT 0.21 decides it
(`check_target_module_exists` over the module names `model.layers.{i}.self_attn.q_proj`, ...):
`target_modules` as a list (suffixes or full names; "all-linear" is saved expanded to full
names, and the literal string is taken as every projection), or a string (a regex the whole
name must match); `layers_to_transform` (an int or a list, with `layers_pattern`) for list
targets that are not full names; `exclude_modules` (list: names or suffixes; string: regex).
Those modules must have both `lora_A` and `lora_B`, and no other module may. `rank_pattern` /
`alpha_pattern` as PEFT's `get_pattern_key`; `use_rslora`; `bias` "none" always, and
"lora_only" / "all" as long as the file holds no bias tensor (on a base model without biases
PEFT saves none; trained bias tensors, and `lora_bias`'s `lora_B.bias`, are refused);
`fan_in_fan_out` is ignored as PEFT ignores it for `nn.Linear`. Refused: DoRA,
`modules_to_save`, `layer_replication`, `target_parameters`, trainable tokens, aLoRA and the
other variants that change the forward.
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
_BIAS = re.compile(r"\.bias$")
# adapter_config.json keys whose truthy value changes the forward in a way not implemented here.
_UNSUPPORTED = {
    "use_dora": "DoRA", "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "layer_replication": "layer_replication", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)", "arrow_config": "Arrow routing",
    "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA", "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA", "velora_config": "VeLoRA", "lora_bias": "lora_bias",
}
_OTHER_MODULES = ("lm_head", "model.embed_tokens", "model.norm")
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
    target_modules: tuple[str, ...]  # among TARGET_MODULES, adapted in at least one layer
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


def module_name(layer: int, module: str) -> str:
    """PEFT's name of a projection, e.g. `model.layers.3.self_attn.q_proj`."""
    return f"model.layers.{layer}.{'self_attn' if module in ATTN_MODULES else 'mlp'}.{module}"


def _listed(items: list[str], key: str) -> bool:
    return key in items or any(key.endswith(f".{item}") for item in items)


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    """PEFT's layer index of `key` (the first numbered segment, or after `layers_pattern`)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _is_target(raw: dict[str, Any], targets: Any, key: str) -> bool:
    """PEFT's `check_target_module_exists` for one module name."""
    exclude = raw.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif _listed(list(exclude), key):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = raw.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(key, raw.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _targets(name: str, raw: dict[str, Any], cfg: LlamaConfig) -> set[tuple[int, str]]:
    """The (layer, module) pairs PEFT adapts for this config on the base model `cfg`."""
    targets = raw.get("target_modules")
    if targets == "all-linear":  # every linear layer but the output head (PEFT's rule)
        targets = list(TARGET_MODULES)
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterError(f"adapter {name!r}: target_modules regex {targets!r} is invalid ({e})") from e
        other = [m for m in _OTHER_MODULES if re.fullmatch(targets, m)]
        if other:
            raise AdapterError(f"adapter {name!r}: target_modules regex {targets!r} matches "
                               f"{other}, which dlora cannot adapt (only {', '.join(TARGET_MODULES)})")
    elif not isinstance(targets, list | tuple) or not targets or not all(
        isinstance(t, str) for t in targets
    ):
        raise AdapterError(f"adapter {name!r}: target_modules must be a non-empty list of names")
    else:
        names = [module_name(i, m) for i in range(cfg.num_layers) for m in TARGET_MODULES]
        unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unknown:
            raise AdapterError(
                f"adapter {name!r}: module(s) {unknown} are not supported targets "
                f"(supported: {', '.join(TARGET_MODULES)}, in layers 0..{cfg.num_layers - 1})"
            )
        targets = list(targets)
    selected = {
        (i, m)
        for i in range(cfg.num_layers)
        for m in TARGET_MODULES
        if _is_target(raw, targets, module_name(i, m))
    }
    if not selected:
        raise AdapterError(
            f"adapter {name!r}: target_modules {raw.get('target_modules')!r} (with "
            "layers_to_transform / exclude_modules) selects no projection of the base model"
        )
    return selected


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
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise AdapterError(f"adapter {name!r}: {key}={raw[key]!r} ({what}) is not supported")
    if raw.get("bias", "none") not in ("none", "lora_only", "all"):
        raise AdapterError(f"adapter {name!r}: bias {raw['bias']!r} is not none, lora_only or all")
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
    selected = _targets(name, raw, config)
    tensors = _read_tensors(folder, name)

    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if _BIAS.search(key):
                raise AdapterError(
                    f"adapter {name!r}: tensor {key!r} is a trained bias (PEFT bias="
                    f"{raw.get('bias', 'none')!r} or lora_bias on a base model with biases); "
                    "dlora does not apply adapter biases"
                )
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} is not a LoRA weight of a "
                "Llama projection (embeddings and lm_head are unsupported)"
            )
        layer, module, which = int(m.group(1)), m.group(3), m.group(4)
        if module not in TARGET_MODULES:
            raise AdapterError(
                f"adapter {name!r}: module {module!r} in {key!r} is not a supported target "
                f"(supported: {', '.join(TARGET_MODULES)})"
            )
        if layer >= config.num_layers:
            raise AdapterError(
                f"adapter {name!r}: {key!r} names layer {layer} but the base "
                f"model has {config.num_layers} layers"
            )
        if (layer, module) not in selected:
            raise AdapterError(
                f"adapter {name!r}: {key!r} adapts layer {layer} {module!r}, which its "
                "adapter_config.json does not target (target_modules, layers_to_transform, "
                "exclude_modules)"
            )
        found.setdefault((layer, module), {})[which] = t

    modules: dict[tuple[int, str], LoraModule] = {}
    for layer, module in sorted(selected, key=lambda lm: (lm[0], TARGET_MODULES.index(lm[1]))):
        where = f"adapter {name!r}, layer {layer} {module}"
        pair = found.get((layer, module), {})
        for which in ("A", "B"):
            if which not in pair:
                raise AdapterError(
                    f"{where}: lora_{which} weight is missing from adapter_model.safetensors"
                )
        full = module_name(layer, module)
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
    targets = tuple(m for m in TARGET_MODULES if any(mm == m for _, mm in selected))
    return LoraAdapter(name=name, rank=r, target_modules=targets, modules=modules, path=str(folder))
