"""The embedded default: a seeded tiny random-weight Llama, a locally trained byte-level BPE
tokenizer and PEFT adapters of mixed ranks, written in the real on-disk formats.

`write_demo(dir)` backs `dlora init-demo DIR`; `ensure_demo()` writes the demo once under
`$DLORA_HOME/demo` (default `~/.cache/dlora/demo`) and reuses it. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEMO_VERSION = 2  # 2: chat_template.jinja
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 176, 2, 4, 2, 512
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# name -> (r, lora_alpha, use_rslora, target_modules, rank_pattern, alpha_pattern)
DEMO_ADAPTERS: dict[str, tuple[int, int, bool, tuple[str, ...], dict[str, int], dict[str, int]]] = {
    "alpha-r4": (4, 8, False, ("q_proj", "v_proj"), {}, {}),
    "beta-r8": (8, 16, True, ATTN + MLP, {}, {}),
    "gamma-r8": (8, 8, False, ATTN, {"o_proj": 4}, {"o_proj": 16}),
    "delta-r16": (16, 32, False, ATTN + MLP, {"layers.1.mlp.down_proj": 8}, {}),
}

_TEXT = """\
Serving many fine-tuned variants of one large language model is cheap when the variants are
low-rank adapters. A replica keeps the base weights once and adds each request's own small
update. When most requests ask for the same adapter, the replica folds that adapter into the
weights and runs at full speed; when requests spread over many adapters, it keeps the weights
clean and adds every request's update through batched kernels. The scheduler decides every
iteration, and a dispatcher spreads requests and adapters over the replicas of a cluster.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
def hello(name): return "hello, " + name  # 0123456789 + - * / = < > ( ) [ ] { }
Numbers: one two three four five six seven eight nine ten eleven twelve hundred thousand.
Question: what is the capital of France? Answer: Paris. Question: how many legs has a spider?
Answer: eight. Summarize the following text in one sentence. Translate to French: good morning.
"""


DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _TEXT.splitlines() if line] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    _json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "model_max_length": 1024,
            "clean_up_tokenization_spaces": False,
        },
    )
    _json(
        folder / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    )
    # transformers 5 keeps the chat template beside the tokenizer (`chat_template.jinja`)
    (folder / "chat_template.jinja").write_text(DEMO_CHAT_TEMPLATE)


def _json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _module_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of every projection of a demo layer."""
    h, i, hd = HIDDEN, INTERMEDIATE, HIDDEN // HEADS
    return {
        "q_proj": (HEADS * hd, h),
        "k_proj": (KV_HEADS * hd, h),
        "v_proj": (KV_HEADS * hd, h),
        "o_proj": (h, HEADS * hd),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def _model(folder: Path, gen: torch.Generator) -> None:
    from safetensors.torch import save_file

    h = HIDDEN
    shapes = _module_shapes()
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _normal(gen, (VOCAB, h), 1.0)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = 1.0 + _normal(gen, (h,), 0.1)
        t[p + "post_attention_layernorm.weight"] = 1.0 + _normal(gen, (h,), 0.1)
        for m, shape in shapes.items():
            group = "self_attn" if m in ATTN else "mlp"
            t[f"{p}{group}.{m}.weight"] = _normal(gen, shape, shape[1] ** -0.5)
    t["model.norm.weight"] = 1.0 + _normal(gen, (h,), 0.1)
    t["lm_head.weight"] = _normal(gen, (VOCAB, h), 3.0 * h**-0.5)
    save_file(
        {k: v.contiguous() for k, v in t.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _json(
        folder / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": h,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HIDDEN // HEADS,
            "vocab_size": VOCAB,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        },
    )
    _json(
        folder / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False},
    )


def _adapter(folder: Path, gen: torch.Generator, spec: tuple[Any, ...]) -> None:
    from safetensors.torch import save_file

    r, alpha, rslora, targets, rank_pattern, alpha_pattern = spec
    folder.mkdir(parents=True)
    dims = _module_shapes()
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        for m in targets:
            group = "self_attn" if m in ATTN else "mlp"
            name = f"model.layers.{layer}.{group}.{m}"
            mr = next((v for k, v in rank_pattern.items() if name.endswith(k)), r)
            d_out, d_in = dims[m]
            key = f"base_model.model.{name}"
            tensors[key + ".lora_A.weight"] = _normal(gen, (mr, d_in), d_in**-0.5)
            tensors[key + ".lora_B.weight"] = _normal(gen, (d_out, mr), 0.15 * mr**-0.5)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    _json(
        folder / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "dlora-demo",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "use_rslora": rslora,
            "target_modules": list(targets),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "revision": None,
        },
    )


def write_demo(folder: str | Path, seed: int = 0) -> Path:
    """Write the demo model, tokenizer and adapters (DIR/adapters/<name>/) into `folder`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    _model(out, gen)
    _tokenizer(out)
    for name, spec in DEMO_ADAPTERS.items():
        target = out / "adapters" / name
        if target.exists():
            shutil.rmtree(target)
        _adapter(target, gen, spec)
    _json(
        out / "dlora_demo.json",
        {"version": DEMO_VERSION, "seed": seed, "adapters": list(DEMO_ADAPTERS)},
    )
    log.info("wrote the demo model and %d adapters to %s", len(DEMO_ADAPTERS), out)
    return out


def demo_adapter_paths(folder: str | Path) -> dict[int, Path]:
    """Adapter id (0, 1, ...) -> folder, in DEMO_ADAPTERS order."""
    return {i: Path(folder) / "adapters" / n for i, n in enumerate(DEMO_ADAPTERS)}


def ensure_demo(cache_dir: str | Path | None = None) -> Path:
    """The demo folder, written once under `cache_dir` (default `$DLORA_HOME/demo` or
    `~/.cache/dlora/demo`) and reused while its version matches."""
    if cache_dir is None:
        home = os.environ.get("DLORA_HOME")
        cache_dir = Path(home) / "demo" if home else Path.home() / ".cache" / "dlora" / "demo"
    target = Path(cache_dir)
    marker = target / "dlora_demo.json"
    try:
        if json.loads(marker.read_text()).get("version") == DEMO_VERSION:
            return target
    except (OSError, ValueError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    write_demo(tmp)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def extra_demo_adapters(demo: Path, count: int) -> dict[int, Path]:
    """The demo adapters in `demo` plus copies of their shapes with fresh random weights (seeded),
    up to `count` (benchmarks that need more adapters than the demo ships)."""
    paths = demo_adapter_paths(demo)
    specs = list(DEMO_ADAPTERS.values())
    gen = torch.Generator().manual_seed(123)
    for i in range(len(paths), count):
        folder = demo / "adapters" / f"extra-{i}"
        if not folder.exists():
            _adapter(folder, gen, specs[i % len(specs)])
        paths[i] = folder
    return paths
