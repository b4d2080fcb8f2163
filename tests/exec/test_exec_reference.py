"""Our model and adapters against transformers' LlamaForCausalLM and PEFT's PeftModel on the
same demo weights: logits (unmerged and merged) and greedy generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from exec_helpers import PROMPTS, Driver, first_logits, make_request

from dlora.exec import TorchExecutor
from dlora.exec.demo import DEMO_ADAPTERS
from dlora.types import BatchMode, SamplingParams

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
NAMES = list(DEMO_ADAPTERS)


@pytest.fixture(scope="module")
def hf_base(demo_dir: Path):
    return transformers.LlamaForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_peft(demo_dir: Path, adapter_paths: dict[int, Path]):
    base = transformers.LlamaForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter_paths[0]), adapter_name=NAMES[0])
    for i, name in enumerate(NAMES[1:], start=1):
        model.load_adapter(str(adapter_paths[i]), adapter_name=name)
    return model.eval()


def _hf_last_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].float()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_base_logits_match_transformers(executor: TorchExecutor, hf_base, prompt: list[int]):
    ours = first_logits(executor, prompt, None)
    torch.testing.assert_close(ours, _hf_last_logits(hf_base, prompt), rtol=1e-5, atol=1e-5)


def test_full_sequence_logits_match_transformers(executor: TorchExecutor, hf_base):
    """Every position, prefilled in one step, through the paged cache (block size 4)."""
    from dlora.exec.model import StepInputs, build_group

    prompt = PROMPTS[2]
    n = len(prompt)
    executor.kv.reserve(1, n)
    slots = executor.kv.slots(1, 0, n)
    step = StepInputs(
        torch.tensor(prompt),
        torch.arange(n),
        torch.tensor(slots),
        (build_group([(0, 0, n, executor.kv.tables[1])], 4, executor.device),),
        block_size=4,
    )
    ours = executor.model.logits(executor.model.forward(step, executor.kv.pool))
    with torch.no_grad():
        ref = hf_base(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", range(len(NAMES)))
def test_adapter_logits_match_peft_unmerged_and_merged(
    executor: TorchExecutor, hf_base, hf_peft, adapter: int
):
    prompt = PROMPTS[0]
    hf_peft.set_adapter(NAMES[adapter])
    ref = _hf_last_logits(hf_peft, prompt)
    base = _hf_last_logits(hf_base, prompt)
    assert (ref - base).abs().max() > 1e-2  # the adapter really changes the output
    unmerged = first_logits(executor, prompt, adapter, BatchMode.UNMERGED)
    torch.testing.assert_close(unmerged, ref, rtol=1e-4, atol=1e-4)
    hf_peft.merge_adapter()
    try:
        ref_merged = _hf_last_logits(hf_peft, prompt)
    finally:
        hf_peft.unmerge_adapter()
    merged = first_logits(executor, prompt, adapter, BatchMode.MERGED)
    torch.testing.assert_close(merged, ref_merged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_greedy_generation_token_identical_to_peft_generate(executor: TorchExecutor, hf_peft):
    """All prompts with mixed adapters (and the base) in one batch, joining at different steps
    (prefill next to decodes), against PEFT generate run one request at a time."""
    max_new = 12
    specs = [(p, a) for a, p in zip([0, 1, 2, 3, None, 1], PROMPTS + PROMPTS[:2], strict=True)]
    reqs = [
        make_request(i, p, a, max_new, SamplingParams(ignore_eos=False))
        for i, (p, a) in enumerate(specs)
    ]
    ours = Driver(executor).run(reqs, join=[0, 0, 1, 2, 3, 5])
    for i, (prompt, adapter) in enumerate(specs):
        inputs = torch.tensor([prompt])
        with torch.no_grad():
            if adapter is None:
                with hf_peft.disable_adapter():
                    out = hf_peft.generate(inputs, max_new_tokens=max_new, do_sample=False)
            else:
                hf_peft.set_adapter(NAMES[adapter])
                out = hf_peft.generate(inputs, max_new_tokens=max_new, do_sample=False)
        assert ours[i] == out[0, len(prompt) :].tolist(), f"request {i} adapter {adapter}"
