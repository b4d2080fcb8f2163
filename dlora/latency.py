"""The `LatencyModel`: a profile (`profile.py`, the YAML format) turned into seconds for a batch's
shape. This is the only place in the simulator that knows time.

Step time of one iteration:

    step = linear(total_tokens)                       # every non-attention op, piecewise linear
         + per_seq_s * sequences                       # sampling and bookkeeping
         + scheduler_s                                 # dlora's own scheduling per iteration
         + attention_decode_s_per_token * decode_context_tokens
         + attention_prefill_s_per_pair * prefill_attention_pairs
         + [prefill and decode items in one iteration]
               attention_mixed_s_per_decode_token * decode_context_tokens
             + attention_mixed_s_per_decode_seq * decode_seqs
         + attention_skew_{decode|mixed} * (decode attention per token)
               * (decode_seqs * longest decode context - decode_context_tokens)
         + [unmerged, >= 1 adapter] lora.fixed_s + lora.per_adapter_s * distinct adapters
                                   + lora.per_adapter_rank_s * sum of their ranks
                                   + lora.per_token_s * LoRA tokens
                                   + lora.per_token_rank_s * sum(tokens x rank)

Switching merged state costs `merge.base_s + merge.per_rank_s * rank` (and the same form for
unmerge, or one fused `switch` pass when the profile has it); loading an adapter costs its bytes
over `adapter_load.bandwidth_bytes_per_s`.

The mixed-iteration terms price decode attention that runs beside a prefill chunk (vLLM's
varlen prefill kernel instead of its decode kernel): in LLMServingSim's RTX PRO 6000 grids
(Llama-3.1-8B, Qwen3-32B; about 19,000 rows each) it costs about twice the decode-only figure.
Of the forms tried (none; per decode context token; + a fixed part; + per decode sequence) the
last two-term form fits best: decode-only rows 8.5% mean error against 62% with no mixed term
and 18% with the context term alone (Llama, one GPU), the worst row 0.92 against 1.84; a fixed
part fits near zero and is left out. They are optional: a profile without them (every profile
written before they existed) has both at 0, i.e. decode attention costs the same with or
without a prefill chunk beside it. `latency.lora`, `latency.merge` and `latency.unmerge` are required: a profile
that leaves them out would silently price LoRA and switches at zero. A batch whose longest
context exceeds `range.max_context_tokens` is outside the measured range like a batch with too
many tokens; the simulator checks every request's longest context before it starts
(`check_contexts`).

`baselines` (optional) prices the systems dLoRA is compared with where they cost more than
this profile's kernels (issue 12; `core/baselines.py` says what each policy stands for). A
`LatencyModel` built for a baseline policy (`baseline=` its registry name) applies that entry:
every compute term (linear, per_seq_s, attention, LoRA) times `step_cost_factor`. Absent, a
baseline runs at this profile's own kernels, which is how every profile written before the
field behaves. Built with `static_batches` (the `peft` policy's parameter: S-LoRA's static
padded loop), it also pads: decode attention at the batch's longest context (every row of a
padded batch has its length) and a pure prefill of fresh prompts at prompts x the longest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .errors import ProfileError
from .profile import BaselineCost, BaselineCosts, Curve, Latency, LoraCost, Profile
from .types import BatchMode, BatchShape, Request


class LatencyModel:
    """Batch shape -> seconds, from a Profile. Raises ProfileError outside the measured range
    unless `allow_extrapolation`. Built for a baseline policy (`baseline`: its registry name)
    whose cost the profile lists under `baselines`, it prices that system (module docstring):
    `latency` is then the profile's compute terms scaled by its `step_cost_factor`; with
    `static_batches` it pads as a static batch does."""

    def __init__(self, profile: Profile, allow_extrapolation: bool = False, baseline: str | None = None,
                 static_batches: bool = False) -> None:
        self.profile = profile
        self.model = profile.model
        self.range = profile.range
        self.allow_extrapolation = allow_extrapolation
        cost = getattr(profile.baselines, baseline, None) if baseline in BASELINE_NAMES else None
        self.baseline_cost: BaselineCost | None = cost
        self.pads_static_batches = static_batches
        latency = profile.latency
        if cost is not None or static_batches:
            latency = baseline_latency(latency, cost.step_cost_factor if cost else 1.0, static_batches)
        self.latency = latency

    def step_s(self, shape: BatchShape) -> float:
        """Seconds of one forward iteration of this shape (no switch, load or swap)."""
        tokens = shape.total_tokens
        if tokens == 0:
            return 0.0
        if not self.allow_extrapolation:
            self.check_range(shape)
        if self.pads_static_batches and shape.prefill_seqs > 1 and not shape.decode_seqs:
            shape = padded_prefill(shape)
        return self.step_parts_s(shape, shape.decode_context_tokens)

    def step_parts_s(self, shape: BatchShape, decode_context_tokens: int) -> float:
        """`step_s` with the decode context given separately, as `head + attention + tail`.
        The simulator's fast path evaluates the same three parts for growing contexts, so its
        results are bit-identical to calling `step_s` on each iteration's shape."""
        t = self.head_s(shape)
        t += self.latency.attention_decode_s_per_token * decode_context_tokens
        if shape.prefill_tokens and shape.decode_seqs:  # never in a pure-decode iteration
            t += self.mixed_s(shape.decode_seqs, decode_context_tokens)
        t += self.tail_s(shape)
        return t

    def skew_s(self, shape: BatchShape) -> float:
        """Decode attention over unequal contexts costs more than over their mean: a share
        (`attention_skew_*`) of the gap to every sequence at the longest context. The gap
        (seqs x longest - total context) is the same in every iteration of a pure-decode run of
        the same requests, so the fast path stays bit-identical."""
        lat = self.latency
        gap = shape.decode_seqs * shape.decode_max_context_tokens - shape.decode_context_tokens
        if gap <= 0:
            return 0.0
        if shape.prefill_tokens:
            per_token = lat.attention_decode_s_per_token + lat.attention_mixed_s_per_decode_token
            return lat.attention_skew_mixed * per_token * gap
        return lat.attention_skew_decode * lat.attention_decode_s_per_token * gap

    def mixed_s(self, decode_seqs: int, decode_context_tokens: int) -> float:
        """The extra decode-attention cost of an iteration that also carries prefill tokens."""
        lat = self.latency
        return (lat.attention_mixed_s_per_decode_token * decode_context_tokens
                + lat.attention_mixed_s_per_decode_seq * decode_seqs)

    def step_terms_s(self, tokens: int, seqs: int, decode_context_tokens: int, prefill_pairs: int,
                     num_adapters: int, lora_token_rank: int) -> float:
        """`step_s` of a batch given by its numbers (no range check); ranks are taken equal."""
        rank = lora_token_rank // max(tokens, 1) if num_adapters else 0
        shape = BatchShape(
            prefill_tokens=tokens - min(seqs, tokens) if prefill_pairs else 0, prefill_context_tokens=0,
            decode_seqs=seqs, decode_context_tokens=decode_context_tokens,
            mode=BatchMode.UNMERGED if num_adapters else BatchMode.MERGED,
            adapter_ranks=(rank,) * num_adapters, lora_tokens=tokens if num_adapters else 0,
            lora_token_rank=lora_token_rank, prefill_attention_pairs=prefill_pairs,
        )
        return self.step_parts_s(shape, decode_context_tokens)

    def head_s(self, shape: BatchShape) -> float:
        lat = self.latency
        return (lat.linear(shape.total_tokens) + lat.per_seq_s * (shape.decode_seqs + shape.prefill_seqs)
                + lat.scheduler_s)

    def tail_s(self, shape: BatchShape) -> float:
        lat = self.latency
        t = lat.attention_prefill_s_per_pair * shape.prefill_attention_pairs
        if shape.decode_max_context_tokens and (lat.attention_skew_decode or lat.attention_skew_mixed):
            t += self.skew_s(shape)
        if shape.mode == BatchMode.UNMERGED and shape.adapter_ranks:
            lora = lat.lora
            t += (lora.fixed_s + lora.per_adapter_s * len(shape.adapter_ranks)
                  + lora.per_adapter_rank_s * sum(shape.adapter_ranks)
                  + lora.per_token_s * shape.lora_tokens
                  + lora.per_token_rank_s * shape.lora_token_rank)
        return t

    def check_range(self, shape: BatchShape) -> None:
        """Raise ProfileError if the shape is beyond the profile's measured range (what
        `step_s` checks unless `allow_extrapolation`)."""
        problem = self.out_of_range(shape)
        if problem is not None:
            raise ProfileError(problem)

    def out_of_range(self, shape: BatchShape) -> str | None:
        """Why the shape is beyond the profile's measured range, or None (the simulator's fast
        path leaves such an iteration to stepping, which stops the run there, or first preempts
        and runs a smaller batch)."""
        r = self.range
        if shape.total_tokens > r.max_batch_tokens:
            return (f"batch of {shape.total_tokens} tokens is beyond the profile's measured range "
                    f"({r.max_batch_tokens}); lower cluster.max_batched_tokens or set "
                    "model.allow_extrapolation: true")
        if shape.decode_seqs > r.max_decode_seqs:
            return (f"batch of {shape.decode_seqs} decoding sequences is beyond the profile's measured "
                    f"range ({r.max_decode_seqs}); lower cluster.max_batch_size or set "
                    "model.allow_extrapolation: true")
        context = shape.max_context_tokens
        if not context and shape.decode_seqs:  # a shape built without its longest context
            context = -(-shape.decode_context_tokens // shape.decode_seqs)
        if context > r.max_context_tokens:
            return (f"a request with {context} tokens of context is beyond the profile's measured "
                    f"range ({r.max_context_tokens}); shorten the requests or set "
                    "model.allow_extrapolation: true")
        return None

    def check_contexts(self, requests: Sequence[Request],
                       runs: Callable[[Request], bool] = lambda r: True) -> None:
        """Raise ProfileError, unless `allow_extrapolation`, if a request that `runs` would
        reach a context beyond the profile's measured range: prompt + output - 1 tokens (its
        last decode iteration; a recompute or a migration never goes further; a request asking
        for no output still generates one token, its prompt is the context). The simulator
        checks the requests it will run with it before any work (a step beyond the range would
        stop the run later), leaving out those no replica could ever hold (rejected one by one,
        as before)."""
        if self.allow_extrapolation or not requests:
            return
        limit = self.range.max_context_tokens

        def longest(r: Request) -> int:
            return r.prompt_tokens + max(r.output_tokens, 1) - 1

        over = [r for r in requests if longest(r) > limit and runs(r)]
        if over:
            worst = max(over, key=lambda r: (longest(r), -r.id))
            raise ProfileError(
                f"{len(over):,} of {len(requests):,} requests reach a context beyond the profile's "
                f"measured range ({limit} tokens), up to {longest(worst)} "
                f"(request {worst.id}: {worst.prompt_tokens} prompt + {worst.output_tokens} output tokens); "
                "shorten the requests (workload.lengths) or set model.allow_extrapolation: true")

    def decode_step_s(self, batch_size: int, context_tokens: int, mode: BatchMode,
                      num_adapters: int = 1, rank: int = 16) -> float:
        """A typical decode iteration: `batch_size` sequences of `context_tokens` each."""
        ranks = tuple([rank] * num_adapters) if mode == BatchMode.UNMERGED else ()
        shape = BatchShape(
            prefill_tokens=0, prefill_seqs=0, prefill_context_tokens=0, decode_seqs=batch_size,
            decode_context_tokens=batch_size * context_tokens, mode=mode, adapter_ranks=ranks,
            lora_tokens=batch_size if ranks else 0, lora_token_rank=batch_size * rank if ranks else 0,
            prefill_attention_pairs=0, max_context_tokens=context_tokens,
        )
        return self.step_s(shape)

    def switch_s(self, unmerge_rank: int | None, merge_rank: int | None) -> float:
        fused = self.latency.switch
        if fused is not None and unmerge_rank is not None and merge_rank is not None:
            return fused(unmerge_rank + merge_rank)
        t = 0.0
        if unmerge_rank is not None:
            t += self.latency.unmerge(unmerge_rank)
        if merge_rank is not None:
            t += self.latency.merge(merge_rank)
        return t

    def load_s(self, num_bytes: int) -> float:
        return self.latency.adapter_load.seconds(num_bytes)

    def swap_s(self, tokens: int) -> float:
        return self.latency.swap.seconds(tokens * self.kv_bytes_per_token)

    def kv_transfer_s(self, tokens: int) -> float:
        return self.latency.kv_transfer.seconds(tokens * self.kv_bytes_per_token)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    def kv_capacity_bytes(self) -> int:
        """Device memory left for KV cache and adapters after weights and reserve."""
        free = self.profile.memory.device_bytes - self.model.weight_bytes - self.profile.memory.reserved_bytes
        if free <= 0:
            raise ProfileError(
                f"profile {self.profile.provenance.model}: weights ({self.model.weight_bytes} B) and "
                f"reserve do not fit in device memory ({self.profile.memory.device_bytes} B)"
            )
        return free


BASELINE_NAMES = tuple(f.name for f in dataclasses.fields(BaselineCosts))


def baseline_latency(latency: Latency, factor: float, static_batches: bool) -> Latency:
    """The profile's compute terms x `factor` (switches and transfers unchanged: they are the
    same copies on the same hardware); with `static_batches` every decode sequence pays the
    longest context (the skew shares at 1: a padded batch's rows all have its length)."""
    f = factor
    lora = latency.lora
    return dataclasses.replace(
        latency,
        linear=Curve(latency.linear.tokens, tuple(s * f for s in latency.linear.seconds)),
        per_seq_s=latency.per_seq_s * f,
        attention_decode_s_per_token=latency.attention_decode_s_per_token * f,
        attention_prefill_s_per_pair=latency.attention_prefill_s_per_pair * f,
        attention_mixed_s_per_decode_token=latency.attention_mixed_s_per_decode_token * f,
        attention_mixed_s_per_decode_seq=latency.attention_mixed_s_per_decode_seq * f,
        lora=LoraCost(fixed_s=lora.fixed_s * f, per_adapter_s=lora.per_adapter_s * f,
                      per_adapter_rank_s=lora.per_adapter_rank_s * f, per_token_s=lora.per_token_s * f,
                      per_token_rank_s=lora.per_token_rank_s * f),
        attention_skew_decode=1.0 if static_batches else latency.attention_skew_decode,
        attention_skew_mixed=1.0 if static_batches else latency.attention_skew_mixed,
    )


def padded_prefill(shape: BatchShape) -> BatchShape:
    """A pure prefill of fresh prompts as a static padded batch runs it: every prompt at the
    longest (`max_context_tokens`). A chunk that continues a prompt is left as it is."""
    if shape.prefill_context_tokens != shape.prefill_tokens or not shape.max_context_tokens:
        return shape
    n, longest = shape.prefill_seqs, shape.max_context_tokens
    tokens = n * longest
    rank = shape.lora_token_rank // max(shape.lora_tokens, 1) if shape.lora_tokens else 0
    return shape._replace(
        prefill_tokens=tokens, prefill_context_tokens=tokens,
        prefill_attention_pairs=n * longest * (longest + 1) // 2,
        lora_tokens=tokens if shape.lora_tokens else 0, lora_token_rank=tokens * rank,
    )
