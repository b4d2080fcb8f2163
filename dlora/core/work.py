"""Estimated seconds of work a replica holds, from the profile (used by dispatch and migration).

Output lengths are unknown to a real system (PAPER.md section 4, insight 2): the estimate uses a
shared expected output length (the mean of finished requests so far), never the true one.
Sums are kept incrementally so a view costs O(1)."""

from __future__ import annotations

from dataclasses import dataclass

from ..latency import LatencyModel
from ..types import BatchMode, BatchShape, Request
from .context import ReplicaConfig


@dataclass(slots=True)
class OutputLengthEstimate:
    """Mean output tokens of finished requests, shared by a cluster's replicas (`prior` until
    the first finishes). Integer sums keep it independent of the order of observations."""

    prior: float = 128.0
    total_tokens: int = 0
    count: int = 0

    def observe(self, output_tokens: int) -> None:
        self.count += 1
        self.total_tokens += output_tokens

    @property
    def mean_output_tokens(self) -> float:
        return self.total_tokens / self.count if self.count else self.prior


class WorkEstimator:
    """Seconds to drain a replica: pending prefill tokens at the profile's prefill rate plus
    expected remaining decode tokens at the decode rate of a batch of the replica's size."""

    TYPICAL_CONTEXT = 512

    def __init__(self, latency: LatencyModel, config: ReplicaConfig,
                 lengths: OutputLengthEstimate | None = None) -> None:
        self.latency = latency
        self.config = config  # the replica's: its max_batch_size is the batch of the estimate
        self.lengths = lengths or OutputLengthEstimate()
        self.prefill_tokens = 0
        self.generated_tokens = 0
        self.count = 0
        n = min(latency.range.max_batch_tokens, 512)
        shape = BatchShape(n, n, 0, 0, BatchMode.UNMERGED, (16,), n, 16 * n, n * (n + 1) // 2, prefill_seqs=1)
        self.prefill_s_per_token = latency.step_s(shape) / n
        self._decode_per_token: dict[int, float] = {}

    def add(self, r: Request) -> None:
        self.count += 1
        g = r.generated_tokens
        self.generated_tokens += g
        uncomputed = r.prompt_tokens + g - r.computed_tokens  # r.uncomputed_tokens, inlined (hot)
        if uncomputed > 1:
            self.prefill_tokens += uncomputed

    def remove(self, r: Request) -> None:
        self.count -= 1
        g = r.generated_tokens
        self.generated_tokens -= g
        uncomputed = r.prompt_tokens + g - r.computed_tokens
        if uncomputed > 1:
            self.prefill_tokens -= uncomputed

    def decode_s_per_token(self, batch_size: int) -> float:
        t = self._decode_per_token.get(batch_size)  # (a size in range is its own key)
        if t is not None:
            return t
        b = max(1, min(batch_size, self.config.max_batch_size))
        t = self._decode_per_token.get(b)
        if t is None:
            lat = self.latency
            ctx = min(self.TYPICAL_CONTEXT, lat.range.max_context_tokens)
            t = lat.decode_step_s(b, ctx, BatchMode.UNMERGED, num_adapters=min(b, 4)) / b
            self._decode_per_token[b] = t
        return t

    def drain_s(self, num_requests: int, pending_tokens: int = 0) -> tuple[float, float]:
        """Seconds to drain, decode priced at a batch of `num_requests` sequences and at
        `max_batch_size` (full-batch throughput: a view's `queued_work_s` and `backlog_s`),
        `pending_tokens` more output tokens generated than counted so far (decode iterations a
        driver has not applied yet: `ReplicaViews.view`)."""
        count = self.count
        if count <= 0:
            return 0.0, 0.0
        remaining = count * self.lengths.mean_output_tokens - (self.generated_tokens + pending_tokens)
        if count > remaining:  # (max(remaining, count))
            remaining = count
        prefill = self.prefill_tokens * self.prefill_s_per_token
        per = self._decode_per_token  # (the method's own cache read first: a view per holder per arrival)
        at_n = per.get(num_requests) or self.decode_s_per_token(num_requests)
        at_full = per.get(self.config.max_batch_size) or self.decode_s_per_token(self.config.max_batch_size)
        return prefill + remaining * at_n, prefill + remaining * at_full

    def seconds_for_each(self, requests: list[Request]) -> list[float]:
        """`seconds_for` of each request (the same float operations; the shared parts looked
        up once: a migration check asks for every unfinished request)."""
        mean = self.lengths.mean_output_tokens
        per_prefill = self.prefill_s_per_token
        per_decode = self.decode_s_per_token(self.config.max_batch_size)
        out = []
        for r in requests:
            g = r.generated_tokens
            remaining = mean - g
            if remaining < 1.0:  # (max(remaining, 1.0))
                remaining = 1.0
            uncomputed = r.prompt_tokens + g - r.computed_tokens
            out.append((uncomputed if uncomputed > 1 else 0) * per_prefill + remaining * per_decode)
        return out

    def seconds_for(self, r: Request) -> float:
        """Estimated seconds of one request's remaining work on a busy replica (the one-request
        form: `seconds_for_each` is what migration checks call, tested against this)."""
        remaining = max(self.lengths.mean_output_tokens - r.generated_tokens, 1.0)
        uncomputed = r.prompt_tokens + r.generated_tokens - r.computed_tokens  # (r.uncomputed_tokens)
        prefill = uncomputed if uncomputed > 1 else 0
        return prefill * self.prefill_s_per_token + remaining * self.decode_s_per_token(self.config.max_batch_size)
