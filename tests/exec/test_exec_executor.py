"""TorchExecutor semantics: mixed batches equal requests run alone, merged equals unmerged,
paged KV with different lengths and chunked prefill, recompute, swap, KV export / import,
seeded sampling, stop conditions and step errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from exec_helpers import PROMPTS, Driver, first_logits, make_request

from dlora.exec import TorchExecutor
from dlora.types import Batch, BatchItem, BatchMode, SamplingParams


def _alone(ex: TorchExecutor, prompt: list[int], adapter: int | None, n: int) -> list[int]:
    return Driver(ex).run([make_request(0, prompt, adapter, n)])[0]


def test_mixed_adapter_batch_equals_each_request_alone(executor: TorchExecutor):
    adapters = [3, 0, None, 1, 3, 2, 0, 1]
    prompts = [PROMPTS[i % 4] for i in range(8)]
    reqs = [
        make_request(i, p, a, 6) for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
    ]
    together = Driver(executor).run(reqs, join=[0, 1, 1, 2, 0, 3, 4, 2])
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        assert together[i] == _alone(executor, p, a, 6), i
    # logits too, not only argmax: one decode step with all eight next to each other
    logits_alone = [first_logits(executor, p, a) for p, a in zip(prompts, adapters, strict=True)]
    items = tuple(
        BatchItem(100 + i, a, 0, len(p), True)
        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
    )
    reqs = tuple(
        make_request(100 + i, p, a, 2)
        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
    )
    res = executor.execute(Batch(0, 0, BatchMode.UNMERGED, None, items, reqs))
    assert res.error is None
    for i, ref in enumerate(logits_alone):
        torch.testing.assert_close(executor.last_logits[i], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", [0, 1, 2, 3])
def test_merged_equals_unmerged_generation(executor: TorchExecutor, adapter: int):
    reqs = [make_request(i, p, adapter, 8) for i, p in enumerate(PROMPTS)]
    unmerged = Driver(executor).run(reqs)
    reqs = [make_request(i, p, adapter, 8) for i, p in enumerate(PROMPTS)]
    merged = Driver(executor, mode=BatchMode.MERGED, merged=adapter).run(reqs, join=[0, 2, 1, 3])
    assert merged == unmerged
    assert executor.merged_adapter == adapter


def test_chunked_prefill_and_small_blocks_match_one_shot(demo_dir: Path, adapter_paths):
    ex = TorchExecutor(demo_dir, adapter_paths, block_size=1, num_kv_blocks=512)
    reqs = [make_request(i, p, i % 4, 5) for i, p in enumerate(PROMPTS)]
    chunked = Driver(ex, chunk=3).run(reqs, join=[0, 1, 0, 2])
    ex2 = TorchExecutor(demo_dir, adapter_paths, block_size=32, num_kv_blocks=16)
    reqs = [make_request(i, p, i % 4, 5) for i, p in enumerate(PROMPTS)]
    assert chunked == Driver(ex2).run(reqs)
    assert ex.kv_free_blocks == ex.kv_capacity_blocks  # finished requests freed their blocks


def _step(ex: TorchExecutor, req, computed: int, new: int, **actions) -> int:
    res = ex.execute(
        Batch(
            0,
            0,
            BatchMode.UNMERGED,
            None,
            (BatchItem(req.id, req.adapter_id, computed, new, True),),
            (req,),
            **actions,
        )
    )
    assert res.error is None, res.error
    return res.token_ids[0]


def test_recompute_swap_and_kv_export_import(executor: TorchExecutor, demo_dir, adapter_paths):
    req = make_request(1, PROMPTS[0], 1, 10)
    expected = _alone(executor, PROMPTS[0], 1, 4)
    n = len(PROMPTS[0])
    req.output_token_ids.append(_step(executor, req, 0, n))
    # preempted by recompute: KV dropped, whole context processed again
    req.output_token_ids.append(_step(executor, req, 0, n + 1, free_requests=(1,)))
    # swapped out and back in
    executor.execute(Batch(0, 1, BatchMode.UNMERGED, None, (), (), swap_out=(1,)))
    assert not executor.kv.has(1) and executor.kv.is_swapped(1)
    req.output_token_ids.append(_step(executor, req, n + 1, 1, swap_in=(1,)))
    # migrated: exported here, imported into another replica
    other = TorchExecutor(demo_dir, adapter_paths, block_size=8, num_kv_blocks=8)
    other.import_kv(1, executor.export_kv(1))
    req.output_token_ids.append(_step(other, req, n + 2, 1))
    assert req.output_token_ids == expected


def test_seeded_sampling_is_reproducible(executor: TorchExecutor):
    def run(seed: int | None, temperature: float = 1.0, top_p: float = 0.9) -> list[int]:
        sp = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        reqs = [make_request(i, PROMPTS[i], i, 12, sp) for i in range(3)]
        return [t for v in Driver(executor).run(reqs).values() for t in v]

    assert run(7) == run(7)
    assert run(7) != run(8)
    greedy = [
        t
        for v in Driver(executor)
        .run([make_request(i, PROMPTS[i], i, 12) for i in range(3)])
        .values()
        for t in v
    ]
    assert run(7, top_p=1e-6) == greedy
    assert run(3, temperature=0.0) == greedy


def test_stop_conditions(executor: TorchExecutor):
    eos = executor.model.config.eos_token_ids[0]
    req = make_request(1, PROMPTS[1], None, 50, SamplingParams(ignore_eos=True))
    free_run = Driver(executor).run([req])[1]
    assert len(free_run) == 50
    stop_at = free_run[3]
    req = make_request(1, PROMPTS[1], None, 50, SamplingParams(stop_token_ids=(stop_at,)))
    assert Driver(executor).run([req])[1] == free_run[: free_run.index(stop_at) + 1]
    executor.model.config = replace(executor.model.config, eos_token_ids=(eos, stop_at))
    req = make_request(1, PROMPTS[1], None, 50, SamplingParams(ignore_eos=False))
    assert Driver(executor).run([req])[1] == free_run[: free_run.index(stop_at) + 1]
    req = make_request(1, PROMPTS[1], None, 50)  # default: ignore EOS (trace replay)
    assert Driver(executor).run([req])[1] == free_run


def test_step_errors_leave_executor_usable(demo_dir: Path, adapter_paths):
    ex = TorchExecutor(demo_dir, adapter_paths, block_size=4, num_kv_blocks=3)
    long = make_request(1, list(range(1, 20)), 0, 2)
    res = ex.execute(
        Batch(0, 0, BatchMode.UNMERGED, None, (BatchItem(1, 0, 0, 19, True),), (long,))
    )
    assert res.error is not None and "KV blocks" in res.error
    ex.free_request(1)
    no_tokens = make_request(2, [1, 2], None, 2)
    no_tokens.prompt_token_ids = None
    res = ex.execute(
        Batch(0, 1, BatchMode.UNMERGED, None, (BatchItem(2, None, 0, 2, True),), (no_tokens,))
    )
    assert res.error is not None and "prompt_token_ids" in res.error
    ex.free_request(2)
    assert _alone(ex, PROMPTS[1], 0, 3) == _alone(
        TorchExecutor(demo_dir, adapter_paths), PROMPTS[1], 0, 3
    )


def test_step_result_times_and_actions(executor: TorchExecutor):
    req = make_request(1, PROMPTS[0], 2, 4)
    res = executor.execute(
        Batch(
            0,
            0,
            BatchMode.MERGED,
            2,
            (BatchItem(1, 2, 0, len(PROMPTS[0]), True),),
            (req,),
            merge_adapter=2,
            load_adapters=(2, 3),
            evict_adapters=(0,),
        )
    )
    assert res.error is None and res.eos == (False,)
    assert res.elapsed_s >= res.switch_s + res.load_s + res.swap_s
    assert res.switch_s > 0 and res.load_s > 0
    assert set(executor.resident_adapters) == {2, 3} and executor.merged_adapter == 2
    res = executor.execute(Batch(0, 1, BatchMode.UNMERGED, None, (), (), unmerge_adapter=2))
    assert executor.merged_adapter is None and res.token_ids == ()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_executor_matches_cpu(demo_dir: Path, adapter_paths):
    cpu = TorchExecutor(demo_dir, adapter_paths)
    gpu = TorchExecutor(demo_dir, adapter_paths, device="cuda")
    for adapter in (None, 0, 1, 2, 3):
        torch.testing.assert_close(
            first_logits(gpu, PROMPTS[0], adapter).cpu(),
            first_logits(cpu, PROMPTS[0], adapter),
            rtol=1e-3,
            atol=1e-3,
        )
    reqs = [make_request(i, p, i % 4, 6) for i, p in enumerate(PROMPTS)]
    reqs_cpu = [make_request(i, p, i % 4, 6) for i, p in enumerate(PROMPTS)]
    assert Driver(gpu).run(reqs) == Driver(cpu).run(reqs_cpu)


@pytest.mark.parametrize(
    "per_token",
    [[], [0], [-1, -1, 0, 0, 0, 2, 2, -1, 1], [3] * 7, [0, 1, 2, 3, 4], [-1, 0, -1, 0]],
)
def test_segment_runs_match_kernels_make_segments(per_token: list[int]):
    from dlora.exec.lora_slots import _segments
    from dlora.kernels import make_segments

    starts, adapters = make_segments(per_token)
    assert _segments(per_token) == (starts.tolist(), adapters.tolist())


def test_reference_kernel_backend_gives_the_same_logits(demo_dir: Path, adapter_paths):
    ref = TorchExecutor(demo_dir, adapter_paths, lora_backend="reference")
    fast = TorchExecutor(demo_dir, adapter_paths)
    for adapter in range(4):
        torch.testing.assert_close(
            first_logits(ref, PROMPTS[2], adapter),
            first_logits(fast, PROMPTS[2], adapter),
            rtol=1e-5,
            atol=1e-5,
        )
