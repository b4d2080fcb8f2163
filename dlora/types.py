"""Shared values: ids, enums, Request, Adapter, Batch, StepResult, views and actions.

Only a frozen `Batch` crosses from the core to an executor and only a frozen `StepResult`
comes back (DESIGN.md section 3). `Request` is the one mutable record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import NamedTuple, Protocol


class RequestStatus(IntEnum):
    """Ordered life cycle: `status >= FINISHED` means done."""

    PENDING = 0  # created, not yet arrived at a replica
    WAITING = 1  # queued at a replica, no KV on the device
    RUNNING = 2  # holds KV blocks on the device
    SWAPPED = 3  # KV swapped out to host memory
    FINISHED = 4
    ABORTED = 5


class BatchMode(StrEnum):
    MERGED = "merged"
    UNMERGED = "unmerged"


class PreemptMode(StrEnum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


class MigrateMode(StrEnum):
    RECOMPUTE = "recompute"
    TRANSFER = "transfer"


@dataclass(frozen=True, slots=True)
class Adapter:
    """A LoRA adapter of the base model. `size_bytes` follows its own rank (no padding)."""

    id: int
    name: str
    rank: int
    size_bytes: int
    target_modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    path: str | None = None  # PEFT folder on disk (live mode only)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a live request samples; the simulator ignores it. vLLM's semantics and order
    (dlora/exec/sampling.py): logit_bias (token id, bias) pairs, then the repetition (prompt and
    output tokens), frequency and presence (output tokens) penalties, then temperature (0:
    greedy), min_p, top_k (0: off) and top_p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = True
    stop_token_ids: tuple[int, ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # top log-probabilities to return per token (0: the sampled one's only)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities at one output position (log-softmax of the model's raw logits, as
    vLLM's default `raw_logprobs`): the sampled token's, and the `top` most likely tokens'."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True, eq=False)
class Request:
    """One inference request. Token accounting is uniform for prefill, decode and recompute:
    a step processes the request's uncomputed tokens (`context_tokens - computed_tokens`, one
    when decoding) and, once all are computed, samples one new output token."""

    id: int
    adapter_id: int | None  # None: the base model, no adapter
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # tokens to generate (max_tokens; exact length in trace replay)
    status: RequestStatus = RequestStatus.PENDING
    computed_tokens: int = 0  # tokens whose KV exists on the device (or in swap)
    generated_tokens: int = 0
    replica: int | None = None
    dispatch_s: float | None = None
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    num_preemptions: int = 0
    num_migrations: int = 0
    executing_s: float = 0.0  # time spent inside batches (sum of step times it was part of)
    prompt_token_ids: tuple[int, ...] | None = None  # live mode
    prefix_group: int | None = None  # requests of a group (and adapter) share their first prefix_tokens
    prefix_tokens: int = 0  # length of the shared prefix (a system prompt); simulated requests
    output_token_ids: list[int] = field(default_factory=list)  # live mode
    output_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # live, if asked for
    sampling: SamplingParams | None = None  # live mode
    finish_reason: str | None = None
    error: str | None = None  # live: why the request failed alone (finish_reason "error")

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    @property
    def uncomputed_tokens(self) -> int:
        return self.context_tokens - self.computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.uncomputed_tokens > 1 or self.generated_tokens == 0

    @property
    def is_done(self) -> bool:
        return self.status >= RequestStatus.FINISHED

    @property
    def remaining_output_tokens(self) -> int:
        return self.output_tokens - self.generated_tokens

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def latency_per_token_s(self) -> float | None:
        lat = self.latency_s
        return None if lat is None else lat / max(1, self.generated_tokens)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.finish_s is None or self.first_token_s is None or self.generated_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.generated_tokens - 1)


class BatchItem(NamedTuple):
    """One request's part of a batch, frozen at scheduling time (a named tuple: immutable, and
    built several times per simulated iteration, so cheaper than a frozen dataclass)."""

    request_id: int
    adapter_id: int | None
    computed_tokens: int  # KV tokens present before this step (the attention context)
    new_tokens: int  # tokens processed in this step
    samples: bool  # whether this step ends with a sampled token


class BatchShape(NamedTuple):
    """What the latency model needs to know about a batch (a named tuple: immutable, and built
    for every iteration stepped and every jump planned, several times faster than a frozen
    dataclass)."""

    prefill_tokens: int  # new tokens of requests in prefill (or recompute)
    prefill_context_tokens: int  # sum over prefill items of (computed + new) tokens
    decode_seqs: int  # requests processing exactly one new token
    decode_context_tokens: int  # sum of their context lengths
    mode: BatchMode
    adapter_ranks: tuple[int, ...]  # ranks of the distinct adapters in the batch (unmerged)
    lora_tokens: int  # tokens that go through a LoRA side path (unmerged)
    lora_token_rank: int  # sum over those tokens of their adapter's rank
    prefill_attention_pairs: int  # sum over prefill items of new * (computed + (new + 1) / 2)
    prefill_seqs: int = 0  # requests in prefill
    max_context_tokens: int = 0  # the longest item's context (computed + new); 0 = not given
    decode_max_context_tokens: int = 0  # the longest decoding item's context; 0 = not given

    @property
    def total_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


class Batch(NamedTuple):
    """One iteration of one replica, decided by the core, executed by an executor (a named
    tuple: immutable, and built several times per simulated request, so several times cheaper
    than a frozen dataclass; `check` is its invariant).

    Memory actions listed here happen before the forward pass: `unmerge_adapter` /
    `merge_adapter` switch the merged state, `load_adapters` copy adapters host->device,
    `evict_adapters` free device slots, `swap_out` / `swap_in` move KV of requests, and
    `free_requests` drop the KV of requests that finished, aborted or were preempted by
    recompute since the previous batch.
    """

    replica: int
    step: int
    mode: BatchMode
    merged_adapter: int | None  # set iff mode is MERGED
    items: tuple[BatchItem, ...]
    requests: tuple[Request, ...]  # the records (read-only for executors), same order as items
    merge_adapter: int | None = None  # merge this adapter into the weights before running
    unmerge_adapter: int | None = None  # unmerge this one first
    load_adapters: tuple[int, ...] = ()
    evict_adapters: tuple[int, ...] = ()
    swap_out: tuple[int, ...] = ()
    swap_in: tuple[int, ...] = ()
    swap_out_tokens: int = 0
    swap_in_tokens: int = 0
    free_requests: tuple[int, ...] = ()
    transfer_in: tuple[int, ...] = ()  # requests whose KV arrives from another replica
    transfer_in_tokens: int = 0
    load_bytes: int = 0
    forced_by_credit: bool = False

    def check(self) -> Batch:
        """Assert the invariant (a merged adapter iff merged, and then every item of it);
        returns the batch. The core checks every batch its admission forms."""
        assert (self.mode == BatchMode.MERGED) == (self.merged_adapter is not None)
        if self.mode == BatchMode.MERGED:
            assert all(it.adapter_id == self.merged_adapter for it in self.items)
        return self

    @property
    def request_ids(self) -> tuple[int, ...]:
        return tuple(it.request_id for it in self.items)

    @property
    def is_switch(self) -> bool:
        return self.merge_adapter is not None or self.unmerge_adapter is not None

    def shape(self, ranks: dict[int, int]) -> BatchShape:
        """The batch's shape; `ranks` maps adapter id to rank."""
        prefill_tokens = prefill_seqs = prefill_ctx = decode_seqs = decode_ctx = 0
        adapters: set[int] = set()
        lora_tokens = lora_token_rank = pairs = longest = decode_longest = 0
        unmerged = self.mode == BatchMode.UNMERGED
        for _, adapter, computed, new, _ in self.items:  # (named tuples: unpacked, the hot loop)
            total = computed + new
            if total > longest:
                longest = total
            if new == 1 and computed > 0:
                decode_seqs += 1
                decode_ctx += total
                if total > decode_longest:
                    decode_longest = total
            else:
                prefill_tokens += new
                prefill_seqs += 1
                prefill_ctx += total
                pairs += new * (2 * computed + new + 1) // 2
            if unmerged and adapter is not None:
                adapters.add(adapter)
                lora_tokens += new
                lora_token_rank += new * ranks[adapter]
        return BatchShape(
            prefill_tokens=prefill_tokens,
            prefill_seqs=prefill_seqs,
            prefill_context_tokens=prefill_ctx,
            decode_seqs=decode_seqs,
            decode_context_tokens=decode_ctx,
            mode=self.mode,
            adapter_ranks=tuple(sorted(ranks[a] for a in adapters)),
            lora_tokens=lora_tokens,
            lora_token_rank=lora_token_rank,
            prefill_attention_pairs=pairs,
            max_context_tokens=longest,
            decode_max_context_tokens=decode_longest,
        )


@dataclass(frozen=True, slots=True)
class StepResult:
    """What executing a batch took. `elapsed_s` includes `switch_s`, `load_s`, `swap_s` and
    `transfer_s` (the parts not overlapped with compute)."""

    elapsed_s: float
    switch_s: float = 0.0
    load_s: float = 0.0
    swap_s: float = 0.0
    transfer_s: float = 0.0
    token_ids: tuple[int, ...] | None = None  # live: one per item that samples, in item order
    eos: tuple[bool, ...] | None = None  # live: whether that token ends the request
    error: str | None = None  # the step failed (a fault of the replica); its requests are requeued
    faults: tuple[RequestFault, ...] = ()  # live: requests that failed alone (their tokens are placeholders)
    logprobs: tuple[TokenLogprobs | None, ...] | None = None  # live: per sampled token, where asked for


@dataclass(frozen=True, slots=True)
class RequestFault:
    """A fault of one request in a step that otherwise ran (bad input, non-finite logits):
    the live driver fails that request alone; `adapter_id` is set when its adapter is to blame."""

    request_id: int
    message: str
    adapter_id: int | None = None


class Executor(Protocol):
    def execute(self, batch: Batch) -> StepResult: ...
