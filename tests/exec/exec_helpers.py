"""Helpers of the executor tests: prompts and a tiny scheduler that drives TorchExecutor the
way the core does (a module of its own: `conftest` is a name several test folders share)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dlora.exec import TorchExecutor
from dlora.types import Batch, BatchItem, BatchMode, Request, SamplingParams

# The machine's cores are shared: one intra-op thread avoids OpenMP spin-waits that make tiny
# matmuls 20x slower under contention.
torch.set_num_threads(1)

PROMPTS = (
    [1, 396, 285, 451, 78, 70, 14, 267, 391, 297, 90],
    [1, 44, 45, 46, 300, 301, 302],
    [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [1, 200],
)


def make_request(
    rid: int,
    prompt: list[int],
    adapter: int | None,
    max_new: int,
    sampling: SamplingParams | None = None,
) -> Request:
    return Request(
        id=rid,
        adapter_id=adapter,
        arrival_s=0.0,
        prompt_tokens=len(prompt),
        output_tokens=max_new,
        prompt_token_ids=tuple(prompt),
        sampling=sampling,
    )


@dataclass
class Driver:
    """A minimal scheduler: admits request i at step `join[i]`, prefills it in one step (or
    chunks of `chunk` tokens), then decodes one token per step until it ends."""

    ex: TorchExecutor
    mode: BatchMode = BatchMode.UNMERGED
    merged: int | None = None
    chunk: int | None = None
    step: int = 0

    def run(self, reqs: list[Request], join: list[int] | None = None) -> dict[int, list[int]]:
        join = join or [0] * len(reqs)
        active: list[Request] = []
        pending = list(zip(join, reqs, strict=True))
        while pending or active:
            active += [r for j, r in pending if j <= self.step]
            pending = [(j, r) for j, r in pending if j > self.step]
            items = []
            for r in active:
                new = r.context_tokens - r.computed_tokens
                if self.chunk:
                    new = min(new, self.chunk)
                samples = r.computed_tokens + new == r.context_tokens
                items.append(BatchItem(r.id, r.adapter_id, r.computed_tokens, new, samples))
            if not items:
                self.step += 1
                continue
            merged = self.merged if self.mode == BatchMode.MERGED else None
            batch = Batch(
                replica=0,
                step=self.step,
                mode=self.mode,
                merged_adapter=merged,
                items=tuple(items),
                requests=tuple(active),
            )
            result = self.ex.execute(batch)
            assert result.error is None, result.error
            toks = iter(result.token_ids or ())
            ends = iter(result.eos or ())
            done = []
            for it, r in zip(items, active, strict=True):
                r.computed_tokens += it.new_tokens
                if it.samples:
                    r.output_token_ids.append(next(toks))
                    r.generated_tokens += 1
                    if next(ends):
                        done.append(r)
            for r in done:
                active.remove(r)
            if done:
                self.ex.execute(
                    Batch(
                        replica=0,
                        step=self.step,
                        mode=self.mode,
                        merged_adapter=merged,
                        items=(),
                        requests=(),
                        free_requests=tuple(r.id for r in done),
                    )
                )
            self.step += 1
        return {r.id: list(r.output_token_ids) for r in reqs}


def first_logits(
    ex: TorchExecutor,
    prompt: list[int],
    adapter: int | None,
    mode: BatchMode = BatchMode.UNMERGED,
    rid: int = 10_000,
) -> torch.Tensor:
    """Logits of the next token after `prompt`, from one prefill step."""
    req = make_request(rid, prompt, adapter, 4)
    merged = adapter if mode == BatchMode.MERGED else None
    res = ex.execute(
        Batch(
            replica=0,
            step=0,
            mode=mode,
            merged_adapter=merged,
            items=(BatchItem(rid, adapter, 0, len(prompt), True),),
            requests=(req,),
        )
    )
    assert res.error is None, res.error
    assert ex.last_logits is not None
    ex.free_request(rid)
    return ex.last_logits[0].clone()
