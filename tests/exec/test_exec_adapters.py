"""PEFT adapter validation (every bad case names adapter, module and problem), the executor
serving the valid adapters next to a bad one, and exact restore after merge / unmerge."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from exec_helpers import PROMPTS, first_logits, make_request
from safetensors.torch import load_file, save_file

from dlora.errors import AdapterError
from dlora.exec import TorchExecutor, load_adapter
from dlora.exec.loader import parse_config
from dlora.exec.lora_slots import MergeState
from dlora.types import Batch, BatchItem, BatchMode

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        t = load_file(str(folder / WEIGHTS))
        fn(t)
        save_file(t, str(folder / WEIGHTS))

    return edit


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / CONFIG).read_text())
        cfg.update(changes)
        (folder / CONFIG).write_text(json.dumps(cfg))

    return edit


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, value)


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[Q0 + ".lora_B.weight"][0, 0] = float("nan")


def _inf(t: dict[str, torch.Tensor]) -> None:
    t[Q0 + ".lora_A.weight"][1, 2] = float("inf")


BAD = {
    "missing folder": (lambda f: shutil.rmtree(f), "does not exist"),
    "missing config": (lambda f: (f / CONFIG).unlink(), "adapter_config.json is missing"),
    "malformed config": (lambda f: (f / CONFIG).write_text("{r: 4,"), "not valid JSON"),
    "no r": (_edit_config(r=None), "integer r"),
    "not lora": (_edit_config(peft_type="IA3"), "not LORA"),
    "unknown target": (_edit_config(target_modules=["q_proj", "lm_head"]), "lm_head"),
    "missing weights": (lambda f: (f / WEIGHTS).unlink(), "adapter_model.safetensors is missing"),
    "corrupt weights": (lambda f: (f / WEIGHTS).write_bytes(b"\x08\x00\x00garbage"), "corrupt"),
    "truncated weights": (
        lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:300]),
        "corrupt",
    ),
    "missing module": (
        _edit_tensors(lambda t: t.pop(Q0 + ".lora_B.weight")),
        "layer 0 q_proj: lora_B weight is missing",
    ),
    "untargeted module": (
        _edit_tensors(_set(Q0.replace("q_proj", "k_proj") + ".lora_A.weight", torch.zeros(4, 64))),
        "'k_proj'",
    ),
    "unknown tensor": (
        _edit_tensors(_set("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64))),
        "lm_head",
    ),
    "layer out of range": (
        _edit_tensors(
            _set(Q0.replace("layers.0", "layers.9") + ".lora_A.weight", torch.zeros(4, 64))
        ),
        "layer 9",
    ),
    "shape mismatch": (
        _edit_tensors(_set(Q0 + ".lora_A.weight", torch.zeros(4, 65))),
        "layer 0 q_proj: lora_A has shape (4, 65)",
    ),
    "rank mismatch": (_edit_config(r=8), "layer 0 q_proj: lora_A has shape (4, 64)"),
    "integer dtype": (
        _edit_tensors(_set(Q0 + ".lora_A.weight", torch.zeros(4, 64, dtype=torch.int32))),
        "dtype",
    ),
    "nan": (_edit_tensors(_nan), "layer 0 q_proj: lora_B contains NaN"),
    "inf": (_edit_tensors(_inf), "layer 0 q_proj: lora_A contains NaN or Inf"),
    "dora": (_edit_config(use_dora=True), "use_dora"),
}


@pytest.fixture()
def bad_copy(tmp_path: Path, adapter_paths: dict[int, Path]) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(adapter_paths[0], target)  # alpha-r4: q_proj and v_proj, rank 4
    return target


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_gives_adapter_error(demo_dir: Path, bad_copy: Path, case: str):
    break_it, expected = BAD[case]
    break_it(bad_copy)
    with pytest.raises(AdapterError) as info:
        load_adapter(bad_copy, parse_config(demo_dir))
    assert "'broken'" in str(info.value)
    assert expected in str(info.value)


def test_executor_keeps_serving_other_adapters(demo_dir: Path, adapter_paths, bad_copy: Path):
    _nan(t := load_file(str(bad_copy / WEIGHTS)))
    save_file(t, str(bad_copy / WEIGHTS))
    ex = TorchExecutor(demo_dir, {0: adapter_paths[0], 7: bad_copy}, block_size=4)
    assert ex.has_adapter(0) and not ex.has_adapter(7)
    assert "NaN" in ex.adapter_errors[7]
    bad = ex.execute(
        Batch(
            replica=0,
            step=0,
            mode=BatchMode.UNMERGED,
            merged_adapter=None,
            items=(BatchItem(1, 7, 0, 3, True),),
            requests=(make_request(1, [1, 2, 3], 7, 2),),
        )
    )
    # the request of the broken adapter fails alone; the step itself ran (not a replica fault)
    assert bad.error is None and [f.request_id for f in bad.faults] == [1]
    assert "'broken'" in bad.faults[0].message and bad.faults[0].adapter_id == 7
    good = first_logits(ex, PROMPTS[0], 0)
    assert torch.isfinite(good).all()
    with pytest.raises(AdapterError, match="'nowhere': folder .* does not exist"):
        ex.register_adapter(8, bad_copy.parent / "nowhere")
    unknown = ex.execute(
        Batch(
            replica=0,
            step=1,
            mode=BatchMode.UNMERGED,
            merged_adapter=None,
            items=(BatchItem(2, 5, 0, 3, True),),
            requests=(make_request(2, [1, 2, 3], 5, 2),),
        )
    )
    assert unknown.error is None and [f.request_id for f in unknown.faults] == [2]
    assert "adapter id 5 is not registered" in unknown.faults[0].message


def test_thousand_merge_unmerge_cycles_restore_base_bit_for_bit(executor: TorchExecutor):
    model = executor.model
    before = {(i, m): w.clone() for i, layer in enumerate(model.layers) for m, w in layer.items()}
    adapters = [executor._host_adapter(a) for a in range(4)]
    state = MergeState(model, backup_device="cpu")
    changed = False
    for cycle in range(1000):
        state.merge(cycle % 4, adapters[cycle % 4])
        if cycle < 4:
            changed |= not torch.equal(model.weight(0, "q_proj"), before[(0, "q_proj")])
        assert state.unmerge() == cycle % 4
    assert changed  # merging really changed the weights
    for (i, m), w in before.items():
        assert torch.equal(model.layers[i][m], w), (i, m)
        assert model.layers[i][m].view(torch.int32).equal(w.view(torch.int32))


def test_executor_switches_restore_base_logits_exactly(executor: TorchExecutor):
    base = first_logits(executor, PROMPTS[1], None)
    for adapter in (0, 3, 1, 3):
        merged = first_logits(executor, PROMPTS[1], adapter, BatchMode.MERGED)
        assert not torch.equal(merged, base)
    assert torch.equal(first_logits(executor, PROMPTS[1], None), base)
    assert executor.merged_adapter is None


def test_types_adapter_with_path_is_a_source(demo_dir: Path, adapter_paths):
    from dlora.types import Adapter

    ex = TorchExecutor(demo_dir, block_size=4)
    spec = Adapter(id=4, name="delta", rank=16, size_bytes=0, path=str(adapter_paths[3]))
    loaded = ex.register_adapter(4, spec)
    assert loaded.name == "delta" and ex.has_adapter(4)
    with pytest.raises(AdapterError, match="'nopath' .* has no path"):
        ex.register_adapter(5, Adapter(id=5, name="nopath", rank=4, size_bytes=0))
    assert not ex.has_adapter(5) and "no path" in ex.adapter_errors[5]
    direct = TorchExecutor(demo_dir, {3: adapter_paths[3]}, block_size=4)
    torch.testing.assert_close(first_logits(ex, PROMPTS[0], 4), first_logits(direct, PROMPTS[0], 3))
