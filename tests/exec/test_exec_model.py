"""Model folders: ModelError for missing or malformed ones, sharded safetensors, RoPE scaling
types against transformers, and the embedded demo (tokenizer, reuse of the cache)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from exec_helpers import PROMPTS
from safetensors.torch import load_file, save_file

from dlora.errors import ModelError
from dlora.exec import LlamaModel, ensure_demo
from dlora.exec.model import StepInputs, build_group


def _logits(model: LlamaModel, prompt: list[int]) -> torch.Tensor:
    n = len(prompt)
    pool = torch.zeros(
        model.config.num_layers,
        2,
        n,
        model.config.num_kv_heads,
        model.config.head_dim,
        dtype=model.dtype,
    )
    step = StepInputs(
        torch.tensor(prompt),
        torch.arange(n),
        torch.arange(n),
        (build_group([(0, 0, n, list(range(n)))], 1, model.device),),
        block_size=1,
    )
    return model.logits(model.forward(step, pool))


@pytest.fixture()
def model_copy(tmp_path: Path, demo_dir: Path) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(demo_dir / name, target / name)
    return target


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


BAD = {
    "missing folder": (lambda f: shutil.rmtree(f), "does not exist"),
    "missing config": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "malformed config": (lambda f: (f / "config.json").write_text("{"), "not valid JSON"),
    "missing key": (lambda f: _edit_config(f, hidden_size=None), "malformed value"),
    "other architecture": (lambda f: _edit_config(f, model_type="gpt2"), "gpt2"),
    "rope type": (
        lambda f: _edit_config(f, rope_scaling={"rope_type": "yarn", "factor": 2.0}),
        "'yarn'",
    ),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no *.safetensors"),
    "corrupt weights": (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), "corrupt"),
    "shape mismatch": (lambda f: _edit_config(f, intermediate_size=100), "implies"),
    "missing tensor": (
        lambda f: save_file(
            {
                k: v
                for k, v in load_file(str(f / "model.safetensors")).items()
                if "layers.1.mlp.up_proj" not in k
            },
            str(f / "model.safetensors"),
        ),
        "up_proj",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_folder_gives_model_error(model_copy: Path, case: str):
    break_it, expected = BAD[case]
    break_it(model_copy)
    with pytest.raises(ModelError, match=None) as info:
        LlamaModel.from_folder(model_copy)
    assert expected in str(info.value)


def test_sharded_folder_loads_the_same_weights(model_copy: Path, demo_dir: Path):
    tensors = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(model_copy / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    sharded = LlamaModel.from_folder(model_copy)
    assert torch.equal(
        _logits(sharded, PROMPTS[0]), _logits(LlamaModel.from_folder(demo_dir), PROMPTS[0])
    )
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="listed in the index but missing"):
        LlamaModel.from_folder(model_copy)


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {"type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ],
)
def test_rope_scaling_matches_transformers(model_copy: Path, rope: dict | None):
    transformers = pytest.importorskip("transformers")
    _edit_config(model_copy, rope_scaling=rope, rope_theta=500.0)
    ours = _logits(LlamaModel.from_folder(model_copy), PROMPTS[2])
    hf = transformers.LlamaForCausalLM.from_pretrained(model_copy, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[2]])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_load(demo_dir: Path):
    model = LlamaModel.from_folder(demo_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ref = _logits(LlamaModel.from_folder(demo_dir), PROMPTS[0])
    assert (_logits(model, PROMPTS[0]).argmax(-1) == ref.argmax(-1)).float().mean() > 0.7


def test_demo_tokenizer_loads_with_auto_tokenizer(demo_dir: Path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    ids = tok("The quick brown fox").input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert len(ids) < len("The quick brown fox")  # merges were learned
    assert tok.decode(ids, skip_special_tokens=True) == "The quick brown fox"


def test_ensure_demo_writes_once_and_is_seeded(tmp_path: Path, demo_dir: Path):
    first = ensure_demo(tmp_path / "cache")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo(tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert (first / "model.safetensors").read_bytes() == (
        demo_dir / "model.safetensors"
    ).read_bytes()
    assert sorted(p.name for p in (first / "adapters").iterdir()) == sorted(
        p.name for p in (demo_dir / "adapters").iterdir()
    )
