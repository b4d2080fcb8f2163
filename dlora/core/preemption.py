"""Swap or recompute a preempted request, whichever the profile says is cheaper (PAPER.md
section 3). Swapping moves the request's KV to host and back (twice its bytes over the swap
link); recomputing re-prefills its context at the next admission."""

from __future__ import annotations

from ..latency import LatencyModel
from ..types import BatchMode, BatchShape, PreemptMode, Request
from .memory import MemoryPool


def recompute_s(latency: LatencyModel, tokens: int) -> float:
    """Seconds to re-prefill `tokens` of context in one batch (merged-mode cost)."""
    if tokens <= 0:
        return 0.0
    tokens = min(tokens, latency.range.max_batch_tokens)
    shape = BatchShape(
        prefill_tokens=tokens, prefill_seqs=1, prefill_context_tokens=tokens, decode_seqs=0, decode_context_tokens=0,
        mode=BatchMode.MERGED, adapter_ranks=(), lora_tokens=0, lora_token_rank=0,
        prefill_attention_pairs=tokens * (tokens + 1) // 2,
    )
    return latency.step_s(shape)


def swap_round_trip_s(latency: LatencyModel, tokens: int) -> float:
    return 2 * latency.swap_s(tokens)


def choose_preempt_mode(setting: str, r: Request, memory: MemoryPool, latency: LatencyModel) -> PreemptMode:
    """`setting` is recompute, swap or auto. Swap needs host swap space for the request's blocks
    and falls back to recompute without it."""
    if setting == PreemptMode.RECOMPUTE or r.computed_tokens == 0:
        return PreemptMode.RECOMPUTE
    if not memory.can_swap_out(memory.held(r.id)):
        return PreemptMode.RECOMPUTE
    if setting == PreemptMode.SWAP:
        return PreemptMode.SWAP
    swap = swap_round_trip_s(latency, r.computed_tokens)
    return PreemptMode.SWAP if swap < recompute_s(latency, r.computed_tokens) else PreemptMode.RECOMPUTE
