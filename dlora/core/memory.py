"""Device memory of one replica: KV blocks and adapter weights in one pool (PAPER.md section 3).

Counts and bytes only, no tensors. The device budget left after the base weights is shared:
every KV block and every resident adapter takes bytes from the same pool, so an adapter takes
room the KV cache could use and gives it back when evicted (the split moves with demand).
`adapter_budget_bytes` caps the adapters' share (a static split, as in the dLoRA artifact);
None means no cap beyond the pool. Swapped-out KV lives in a bounded host swap space.

Prefix caching (vLLM's automatic prefix caching; `prefix_caching`): a full KV block of a
prompt is registered under a hash chained over its tokens and salted by the adapter
(`prefix.py`), so requests of different adapters never share KV. Hashed blocks are shared by
reference count; when the last holder releases one it stays cached as an evictable block,
counted as free (any allocation may take it back, least recently freed first) until a request
with the same prefix claims it again. So recomputing a preempted request's prompt, or a system
prompt many requests share, costs only the blocks that were evicted meanwhile. The cache is
`prefix_cache.PrefixCache`, a mixin of the pool (a request's own blocks there are index ranges).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .prefix_cache import PrefixCache


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    capacity_bytes: int  # device bytes for KV blocks and adapters together
    block_tokens: int  # tokens per KV block
    block_bytes: int  # bytes of one KV block on this replica
    max_adapter_slots: int | None = None  # resident adapters at most (None: only memory bounds)
    adapter_budget_bytes: int | None = None  # static cap on adapter bytes (None: unified pool)
    swap_capacity_bytes: int = 0  # host memory for swapped KV
    prefix_caching: bool = False  # keep hashed prompt blocks for reuse (vLLM's prefix caching)


class MemoryPool(PrefixCache):
    """Accounting of one replica's device memory. Invariant: 0 <= used <= capacity."""

    def __init__(self, config: MemoryConfig) -> None:
        if config.block_bytes <= 0 or config.block_tokens <= 0:
            raise ConfigError("memory: block size must be positive")
        if config.capacity_bytes < config.block_bytes:
            raise ConfigError(
                f"memory: {config.capacity_bytes} bytes left for the KV cache hold not even one "
                "block; use a larger device or a smaller model"
            )
        self.config = config
        self.block_tokens = config.block_tokens
        self.block_bytes = config.block_bytes
        self.capacity_bytes = config.capacity_bytes  # device bytes for KV and adapters (fixed)
        self.kv_blocks: dict[int, int] = {}  # request id -> device blocks held
        self.swapped_blocks: dict[int, int] = {}  # request id -> host blocks held
        self.adapters: dict[int, int] = {}  # resident adapter id -> bytes (change through
        # load_adapter / evict_adapter only)
        self._resident: frozenset[int] | None = None
        self.kv_used_blocks = 0  # physical blocks held (a shared block counts once)
        self.adapter_bytes = 0
        self.swap_used_blocks = 0
        self._init_prefix_cache()
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- sizes ----
    @property
    def used_bytes(self) -> int:
        return self.kv_used_blocks * self.block_bytes + self.adapter_bytes

    @property
    def free_bytes(self) -> int:
        """Bytes neither KV nor adapters hold (cached prefix blocks count as free)."""
        return self.capacity_bytes - self.used_bytes

    @property
    def free_blocks(self) -> int:
        # (`free_bytes // block_bytes` without its two property calls: admission reads it per request)
        return (self.capacity_bytes - self.kv_used_blocks * self.block_bytes - self.adapter_bytes) // self.block_bytes

    @property
    def kv_capacity_blocks(self) -> int:
        """Blocks the KV cache could hold now (used + free), given resident adapters."""
        return self.kv_used_blocks + self.free_blocks

    @property
    def total_blocks(self) -> int:
        """Blocks with no adapter resident."""
        return self.capacity_bytes // self.block_bytes

    @property
    def swap_capacity_blocks(self) -> int:
        return self.config.swap_capacity_bytes // self.block_bytes

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def held(self, request_id: int) -> int:
        return self.kv_blocks.get(request_id, 0)

    # ---- KV ----
    def allocate(self, request_id: int, blocks: int) -> None:
        """Give a request `blocks` new private blocks (cached blocks are taken back if needed)."""
        assert 0 <= blocks <= self.free_blocks, (blocks, self.free_blocks)
        if blocks:
            self.kv_blocks[request_id] = self.kv_blocks.get(request_id, 0) + blocks
            self.kv_used_blocks += blocks
            self._reclaim()

    def allocate_each(self, needs: list[tuple[int, int]]) -> None:
        """`allocate(request, blocks)` for each pair in turn, cached blocks taken back once at
        the end (the same ones: reclaiming takes the oldest first until the pool fits)."""
        total = sum(n for _, n in needs)
        assert 0 <= total <= self.free_blocks, (total, self.free_blocks)
        kv = self.kv_blocks
        for rid, n in needs:
            kv[rid] = kv.get(rid, 0) + n
        self.kv_used_blocks += total
        self._reclaim()

    @property
    def total_kv_blocks_now(self) -> int:
        """Blocks the pool holds besides the resident adapters."""
        return (self.capacity_bytes - self.adapter_bytes) // self.block_bytes

    def release(self, request_id: int) -> int:
        """Free a request's blocks; its hashed blocks stay cached once nobody holds them.
        Returns the blocks it held."""
        blocks = self.kv_blocks.pop(request_id, 0)
        self.kv_used_blocks -= blocks - self._uncache_released(request_id)
        return blocks

    def can_swap_out(self, blocks: int) -> bool:
        return self.swap_used_blocks + blocks <= self.swap_capacity_blocks

    def swap_out(self, request_id: int) -> int:
        blocks = self.release(request_id)  # its hashed blocks stay cached; it comes back private
        assert self.can_swap_out(blocks)
        self.swapped_blocks[request_id] = blocks
        self.swap_used_blocks += blocks
        return blocks

    def swap_in(self, request_id: int) -> int:
        blocks = self.swapped_blocks.pop(request_id)
        self.swap_used_blocks -= blocks
        self.allocate(request_id, blocks)
        return blocks

    def drop_swapped(self, request_id: int) -> int:
        blocks = self.swapped_blocks.pop(request_id, 0)
        self.swap_used_blocks -= blocks
        return blocks

    # ---- adapters ----
    def is_resident(self, adapter_id: int) -> bool:
        return adapter_id in self.adapters

    def adapter_fits(self, num_bytes: int) -> bool:
        """Whether an adapter of this size fits now without evicting anything."""
        slots = self.config.max_adapter_slots
        if slots is not None and len(self.adapters) >= slots:
            return False
        budget = self.config.adapter_budget_bytes
        if budget is not None and self.adapter_bytes + num_bytes > budget:
            return False
        return num_bytes <= self.free_bytes

    def load_adapter(self, adapter_id: int, num_bytes: int) -> None:
        assert adapter_id not in self.adapters and self.adapter_fits(num_bytes)
        self.adapters[adapter_id] = num_bytes
        self.adapter_bytes += num_bytes
        self._resident = None
        self._reclaim()

    def evict_adapter(self, adapter_id: int) -> int:
        num_bytes = self.adapters.pop(adapter_id)
        self.adapter_bytes -= num_bytes
        self._resident = None
        return num_bytes

    @property
    def resident(self) -> frozenset[int]:
        """The resident adapters' ids (kept until one is loaded or evicted)."""
        if self._resident is None:
            self._resident = frozenset(self.adapters)
        return self._resident

    def check(self) -> None:
        """Internal invariants (tests call this)."""
        held = self._check_prefix_cache()  # (blocks the cache counts as used)
        private = sum(self.kv_blocks.values()) - held[0]
        assert 0 <= self.kv_used_blocks == private + held[1]
        assert self.kv_used_blocks + self.cached_blocks <= self.total_kv_blocks_now
        assert 0 <= self.adapter_bytes == sum(self.adapters.values())
        assert 0 <= self.used_bytes <= self.capacity_bytes
        assert 0 <= self.swap_used_blocks <= max(self.swap_capacity_blocks, 0)
