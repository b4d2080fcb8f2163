"""Reads a Hugging Face Llama-family model folder: `config.json` and one or several
`*.safetensors` files (with or without `model.safetensors.index.json`).

Owns `LlamaConfig` (the fields the forward needs) and `load_model_folder`; every problem
with the folder is a `ModelError` that names the file and what to fix.

What is accepted (anything else the forward would get wrong is refused at load, with the reason;
the semantics are transformers 5's modeling code for each `model_type`):

- `model_type` llama, mistral or qwen2; `architectures` (if given) their `*ForCausalLM`;
  `hidden_act` silu; RMSNorm (`rms_norm_eps`), `head_dim`, grouped-query attention
  (`num_key_value_heads` dividing `num_attention_heads`), `tie_word_embeddings`.
- RoPE (`rope_parameters` of transformers 5 or `rope_scaling` + `rope_theta` of 4): types
  default, linear, llama3; no `partial_rotary_factor` below 1.
- Biases: llama `attention_bias` (q, k, v and o_proj) and `mlp_bias` (gate, up, down); qwen2
  always q, k, v (never o_proj or the MLP); mistral none.
- Sliding-window attention (a query sees itself and the `sliding_window - 1` keys before it):
  mistral on every layer when `sliding_window` is set (`layer_types` is ignored, as
  MistralForCausalLM ignores it); qwen2 only with `use_sliding_window`, on the layers whose
  `layer_types` entry is "sliding_attention" (default: layers from `max_window_layers` on).
- Refused: other `rope_type`s, mixture-of-experts keys (`num_experts`, `num_local_experts`, ...),
  `quantization_config`, logit soft-capping, qk-norm, custom code (`auto_map`), `layer_types`
  other than full / sliding attention, and (in `LlamaModel`) any checkpoint tensor the forward
  does not read (`lm_head.bias`, a bias the config does not enable, extra modules); rotary
  `inv_freq` buffers are skipped. Keys of no effect on the forward (`use_cache`,
  `initializer_range`, `attention_dropout`, `pretraining_tp`, token ids, ...) are ignored;
  a key this module does not know is logged as a warning.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlora.errors import ModelError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Keys read by parse_config, or of no effect on the forward (training, generation defaults).
KNOWN_KEYS = frozenset({
    "architectures", "model_type", "hidden_act", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "mlp_bias", "tie_word_embeddings", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range",
    "attention_dropout", "pretraining_tp", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "is_encoder_decoder", "is_decoder",
    "tie_encoder_decoder", "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
    "task_specific_params", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "finetuning_task", "bad_words_ids", "begin_suppress_tokens",
    "torchscript", "cross_attention_hidden_size", "add_cross_attention", "pruned_heads",
    "use_return_dict", "embd_pdrop", "resid_pdrop", "attn_implementation",
})
# Keys that change the forward in ways this model code does not implement (when truthy).
UNSUPPORTED_KEYS = {
    "num_experts": "mixture of experts", "num_local_experts": "mixture of experts",
    "n_routed_experts": "mixture of experts", "num_experts_per_tok": "mixture of experts",
    "moe_intermediate_size": "mixture of experts", "quantization_config": "quantized weights",
    "auto_map": "custom modeling code", "final_logit_softcapping": "logit soft-capping",
    "attn_logit_softcapping": "attention soft-capping", "use_qk_norm": "qk-norm",
    "qk_layernorm": "qk-norm", "query_pre_attn_scalar": "a custom attention scale",
    "no_rope_layers": "layers without RoPE", "use_parallel_residual": "parallel residuals",
}


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """What the forward needs from `config.json`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    max_positions: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q_proj, k_proj, v_proj carry biases
    o_proj_bias: bool = False
    mlp_bias: bool = False  # gate_proj, up_proj, down_proj carry biases
    sliding_windows: tuple[int | None, ...] = ()  # per layer (empty: no sliding window anywhere)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str = "float32"

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` in tokens (a query sees itself and window - 1 keys
        before it), None for full causal attention."""
        return self.sliding_windows[layer] if self.sliding_windows else None

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of one projection (`q_proj`, ..., `down_proj`)."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        shapes = {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }
        return shapes[module]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelError(f"{path} is missing; a model folder needs config.json") from e
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); fix or re-download it") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return data


def _eos_ids(*values: Any) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        if isinstance(v, int):
            out.append(v)
        elif isinstance(v, list):
            out.extend(int(x) for x in v)
    return tuple(dict.fromkeys(out))


def _check_keys(raw: dict[str, Any], where: Path) -> None:
    for key, what in UNSUPPORTED_KEYS.items():
        if raw.get(key):
            raise ModelError(f"{where}: {key}={raw[key]!r} asks for {what}, which dlora's model "
                             "code does not implement")
    unknown = sorted(k for k in raw if k not in KNOWN_KEYS and k not in UNSUPPORTED_KEYS)
    if unknown:
        log.warning("%s: ignoring config keys dlora does not know: %s", where, ", ".join(unknown))
    archs = raw.get("architectures") or []
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise ModelError(f"{where}: architectures {bad} are not supported (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}; a model with another head "
                         "cannot be served)")


def _sliding_windows(raw: dict[str, Any], model_type: str, layers: int,
                     where: Path) -> tuple[int | None, ...]:
    """Per-layer windows as transformers 5 derives them (see the module docstring)."""
    window = raw.get("sliding_window")
    if model_type == "llama":
        return ()  # LlamaForCausalLM has no sliding window
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if window is None:
        return ()
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ModelError(f"{where}: sliding_window must be a positive integer, got {window!r}")
    if model_type == "mistral":
        return (window,) * layers
    types = raw.get("layer_types")
    if types is None:
        first = int(raw.get("max_window_layers", 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ModelError(f"{where}: layer_types must list {layers} entries among "
                         f"{', '.join(LAYER_TYPES)}, got {types!r}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def parse_config(folder: Path) -> LlamaConfig:
    """Parse `config.json` (transformers 4 `rope_scaling` or 5 `rope_parameters` style)."""
    raw = _read_json(folder / "config.json")
    where = folder / "config.json"
    model_type = raw.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (silu only)")
    _check_keys(raw, where)
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        layers = int(raw["num_hidden_layers"])
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = str(rope.get("rope_type", rope.get("type", "default")))
        if float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))) != 1.0:
            raise ModelError(f"{where}: partial_rotary_factor below 1 (RoPE on part of each "
                             "head) is not supported")
        gen: dict[str, Any] = {}
        if (folder / "generation_config.json").exists():
            gen = _read_json(folder / "generation_config.json")
        llama = model_type == "llama"
        attention_bias = bool(raw.get("attention_bias", False)) and llama
        cfg = LlamaConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
            max_positions=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_proj_bias=attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)) and llama,
            sliding_windows=_sliding_windows(raw, model_type, layers, where),
            eos_token_ids=_eos_ids(raw.get("eos_token_id"), gen.get("eos_token_id")),
            bos_token_id=raw.get("bos_token_id"),
            dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )
    except KeyError as e:
        raise ModelError(f"{where} lacks the key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where} has a malformed value: {e}") from e
    if cfg.rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"{where}: rope type {cfg.rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ModelError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) float32, after the config's RoPE scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "llama3":
        low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index} has no weight_map")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"{folder} holds no *.safetensors weights (pytorch .bin is not "
            "supported; convert with safetensors)"
        )
    for f in files:
        if not f.exists():
            raise ModelError(f"{f} is listed in the index but missing")
    return files


def load_tensors(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files, cast to `dtype`, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{f} cannot be read ({e}); the file is corrupt or truncated") from e
        for name, t in part.items():
            tensors[name.removeprefix("model.") if name.startswith("model.") else name] = (
                t.to(dtype) if t.is_floating_point() else t
            )
    return tensors


def load_model_folder(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, tensors named without the `model.` prefix, e.g. `layers.0.self_attn.q_proj.weight`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(
            f"model folder {folder} does not exist; pass a Hugging Face model "
            "folder or run `dlora init-demo DIR`"
        )
    cfg = parse_config(folder)
    if dtype is None:
        dtype = getattr(torch, cfg.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ModelError(f"{folder}/config.json: unknown dtype {cfg.dtype!r}")
    return cfg, load_tensors(folder, dtype)
