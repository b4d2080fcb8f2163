"""Checkpoints and adapters made here by transformers and PEFT (tiny random weights), served by
dlora and compared with transformers+PEFT greedy generation token for token: Llama with
attention and MLP biases, Llama with tied embeddings and no biases, Mistral with a sliding
window of 8 (prompts and outputs past it; prefill whole, chunked, and mixed with other requests),
Qwen2 with a sliding window on its last layer; PEFT adapters on all linear layers, on chosen
layers (`layers_to_transform`), with `exclude_modules`, rsLoRA, rank / alpha patterns and
`bias="all"` on a model without biases. Also what must be refused (checkpoint tensors or config
values the model code does not implement, adapter biases)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from exec_helpers import Driver, make_request
from safetensors.torch import load_file, save_file

from dlora.errors import AdapterError, ModelError
from dlora.exec import LlamaModel, TorchExecutor, load_adapter
from dlora.exec.loader import parse_config
from dlora.types import BatchMode

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
PROMPTS = ([5, 17, 33, 60, 71, 12, 90, 41, 8, 23, 66, 3, 50],  # 13 tokens: past the window of 8
           [44, 9, 77],
           [int(t) for t in torch.arange(20) * 7 % 93 + 3])  # 20 tokens
NEW_TOKENS = 6
MODELS: dict[str, Callable[[], Any]] = {
    "llama-bias": lambda: transformers.LlamaConfig(attention_bias=True, mlp_bias=True, **TINY),
    "llama-tied": lambda: transformers.LlamaConfig(tie_word_embeddings=True, **TINY),
    "mistral-window": lambda: transformers.MistralConfig(sliding_window=8, **TINY),
    "qwen2-window": lambda: transformers.Qwen2Config(
        use_sliding_window=True, sliding_window=8, max_window_layers=1, **TINY),
}
ADAPTERS: dict[str, dict[str, Any]] = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "layer-1-rslora": dict(r=4, lora_alpha=4, use_rslora=True, layers_to_transform=[1],
                           target_modules=["q_proj", "v_proj", "down_proj"]),
    "exclude-patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                             exclude_modules=["model.layers.0.self_attn.q_proj"],
                             rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 16}),
}


def _randomize(model: Any, seed: int, only: str | None = None) -> None:
    """Random weights large enough that every module (and bias) changes the greedy output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is not None and only not in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)


def _peft_adapter(base_dir: Path, out: Path, spec: dict[str, Any], seed: int) -> Path:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(**spec))
    _randomize(model, seed, only="lora_")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """model name -> (checkpoint folder, adapter name -> PEFT folder), all saved with
    save_pretrained."""
    out: dict[str, tuple[Path, dict[str, Path]]] = {}
    for i, (name, make) in enumerate(MODELS.items()):
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(make())
        _randomize(model, 100 + i)
        model.save_pretrained(folder)
        specs = dict(ADAPTERS)
        if name == "mistral-window":  # no biases in the model: PEFT saves no bias tensor
            specs["bias-all"] = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], bias="all")
        adapters = {a: _peft_adapter(folder, folder / "adapters" / a, spec, 10 * i + j)
                    for j, (a, spec) in enumerate(specs.items())}
        out[name] = (folder, adapters)
    return out


def _hf_generate(folder: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    model.generation_config.eos_token_id = None  # dlora's requests here ignore EOS too
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_name", list(MODELS))
def test_greedy_output_matches_transformers_and_peft(artifacts, model_name: str):
    """Every adapter (and the base) on every prompt, all requests in one batch (unmerged,
    joining at different steps, prefill in chunks of 4), then each adapter merged."""
    folder, adapters = artifacts[model_name]
    names = list(adapters)
    ex = TorchExecutor(folder, {i: adapters[a] for i, a in enumerate(names)}, block_size=4,
                       num_kv_blocks=128)
    assert not ex.adapter_errors
    cases = [(aid, p) for aid in [None, *range(len(names))] for p in range(len(PROMPTS))]
    refs = {(aid, p): _hf_generate(folder, None if aid is None else adapters[names[aid]], PROMPTS[p])
            for aid, p in cases}
    for aid in range(len(names)):  # each adapter changes the output (B is random, not zero)
        assert any(refs[(aid, p)] != refs[(None, p)] for p in range(len(PROMPTS))), names[aid]
    reqs = [make_request(k, PROMPTS[p], aid, NEW_TOKENS) for k, (aid, p) in enumerate(cases)]
    got = Driver(ex, chunk=4).run(reqs, join=[k % 3 for k in range(len(reqs))])
    for k, case in enumerate(cases):
        assert got[k] == refs[case], (model_name, case)
    for aid in range(len(names)):  # merged: the adapter folded into the weights
        reqs = [make_request(1000 + p, PROMPTS[p], aid, NEW_TOKENS) for p in range(len(PROMPTS))]
        got = Driver(ex, mode=BatchMode.MERGED, merged=aid).run(reqs)
        for p in range(len(PROMPTS)):
            assert got[1000 + p] == refs[(aid, p)], (model_name, names[aid], "merged", p)


def test_configs_parse_as_transformers_builds_them(artifacts):
    cfg = parse_config(artifacts["llama-bias"][0])
    assert (cfg.qkv_bias, cfg.o_proj_bias, cfg.mlp_bias, cfg.sliding_windows) == (True, True, True, ())
    cfg = parse_config(artifacts["mistral-window"][0])
    assert (cfg.qkv_bias, cfg.o_proj_bias, cfg.sliding_windows) == (False, False, (8, 8))
    cfg = parse_config(artifacts["qwen2-window"][0])
    assert (cfg.qkv_bias, cfg.o_proj_bias, cfg.mlp_bias) == (True, False, False)
    assert cfg.sliding_windows == (None, 8)  # layers from max_window_layers=1 on


def test_adapters_load_the_modules_peft_adapts(artifacts):
    folder, adapters = artifacts["llama-bias"]
    cfg = parse_config(folder)
    every = {(i, m) for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj")}
    assert set(load_adapter(adapters["all-linear"], cfg).modules) == every
    layer1 = load_adapter(adapters["layer-1-rslora"], cfg)
    assert set(layer1.modules) == {(1, "q_proj"), (1, "v_proj"), (1, "down_proj")}
    assert layer1.modules[(1, "q_proj")].scale == pytest.approx(4 / 2)  # alpha / sqrt(r)
    excl = load_adapter(adapters["exclude-patterns"], cfg)
    assert (0, "q_proj") not in excl.modules and (1, "q_proj") in excl.modules
    assert excl.modules[(0, "k_proj")].rank == 2 and excl.modules[(0, "o_proj")].scale == 4.0


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_string_all_linear_and_missing_weights_of_a_targeted_layer(artifacts, tmp_path: Path):
    folder, adapters = artifacts["llama-bias"]
    cfg = parse_config(folder)
    old = _copy(adapters["all-linear"], tmp_path / "old-peft")  # older PEFT kept the string
    _edit_json(old / "adapter_config.json", target_modules="all-linear")
    assert set(load_adapter(old, cfg).modules) == set(load_adapter(adapters["all-linear"], cfg).modules)
    broken = _copy(adapters["layer-1-rslora"], tmp_path / "broken")
    weights = load_file(str(broken / "adapter_model.safetensors"))
    weights.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    save_file(weights, str(broken / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="layer 1 down_proj: lora_B weight is missing"):
        load_adapter(broken, cfg)
    stray = _copy(adapters["layer-1-rslora"], tmp_path / "stray")
    weights = load_file(str(stray / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, str(stray / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="layer 0 'q_proj', which its adapter_config.json does not"):
        load_adapter(stray, cfg)


@pytest.mark.parametrize("spec", [dict(bias="lora_only"), dict(bias="all"), dict(lora_bias=True)])
def test_adapter_biases_are_refused_where_saved(artifacts, tmp_path: Path, spec: dict[str, Any]):
    folder, _ = artifacts["llama-bias"]  # a model with biases: PEFT saves the trained ones
    path = _peft_adapter(folder, tmp_path / "a", dict(r=2, target_modules=["q_proj"], **spec), 0)
    with pytest.raises(AdapterError, match="bias"):
        load_adapter(path, parse_config(folder))


def _weights_edit(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        t = load_file(str(folder / "model.safetensors"))
        fn(t)
        save_file(t, str(folder / "model.safetensors"))
    return edit


REFUSED: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "lm_head bias": ("llama-tied", _weights_edit(lambda t: t.__setitem__("lm_head.bias", torch.zeros(96))),
                     "lm_head.bias"),
    "bias the config lacks": ("llama-bias", lambda f: _edit_json(f / "config.json", mlp_bias=False),
                              "mlp.down_proj.bias"),
    "mixture of experts": ("llama-tied", lambda f: _edit_json(f / "config.json", num_local_experts=8),
                           "mixture of experts"),
    "other head": ("llama-tied", lambda f: _edit_json(
        f / "config.json", architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    "layer types": ("qwen2-window", lambda f: _edit_json(
        f / "config.json", layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    "partial rotary": ("mistral-window", lambda f: _edit_json(
        f / "config.json", partial_rotary_factor=0.5), "partial_rotary_factor"),
    "rope type": ("mistral-window", lambda f: _edit_json(
        f / "config.json", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        "'dynamic'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unimplemented_checkpoints_are_refused_with_the_reason(artifacts, tmp_path: Path, case: str):
    model_name, edit, expected = REFUSED[case]
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((artifacts[model_name][0] / name).read_bytes())
    LlamaModel.from_folder(folder)  # the copy loads before the edit
    edit(folder)
    with pytest.raises(ModelError, match=expected):
        LlamaModel.from_folder(folder)
