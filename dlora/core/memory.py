"""Device memory of one replica: KV blocks and adapter weights in one pool (PAPER.md section 3).

Counts and bytes only, no tensors. The device budget left after the base weights is shared:
every KV block and every resident adapter takes bytes from the same pool, so an adapter takes
room the KV cache could use and gives it back when evicted (the split moves with demand).
`adapter_budget_bytes` caps the adapters' share (a static split, as in the dLoRA artifact);
None means no cap beyond the pool. Swapped-out KV lives in a bounded host swap space.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    capacity_bytes: int  # device bytes for KV blocks and adapters together
    block_tokens: int  # tokens per KV block
    block_bytes: int  # bytes of one KV block on this replica
    max_adapter_slots: int | None = None  # resident adapters at most (None: only memory bounds)
    adapter_budget_bytes: int | None = None  # static cap on adapter bytes (None: unified pool)
    swap_capacity_bytes: int = 0  # host memory for swapped KV


class MemoryPool:
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
        self.kv_blocks: dict[int, int] = {}  # request id -> device blocks held
        self.swapped_blocks: dict[int, int] = {}  # request id -> host blocks held
        self.adapters: dict[int, int] = {}  # resident adapter id -> bytes
        self.kv_used_blocks = 0
        self.adapter_bytes = 0
        self.swap_used_blocks = 0

    # ---- sizes ----
    @property
    def capacity_bytes(self) -> int:
        return self.config.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.kv_used_blocks * self.block_bytes + self.adapter_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @property
    def free_blocks(self) -> int:
        return self.free_bytes // self.block_bytes

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
        assert 0 <= blocks <= self.free_blocks, (blocks, self.free_blocks)
        if blocks:
            self.kv_blocks[request_id] = self.kv_blocks.get(request_id, 0) + blocks
            self.kv_used_blocks += blocks

    def release(self, request_id: int) -> int:
        blocks = self.kv_blocks.pop(request_id, 0)
        self.kv_used_blocks -= blocks
        return blocks

    def can_swap_out(self, blocks: int) -> bool:
        return self.swap_used_blocks + blocks <= self.swap_capacity_blocks

    def swap_out(self, request_id: int) -> int:
        blocks = self.release(request_id)
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

    def evict_adapter(self, adapter_id: int) -> int:
        num_bytes = self.adapters.pop(adapter_id)
        self.adapter_bytes -= num_bytes
        return num_bytes

    def check(self) -> None:
        """Internal invariants (tests call this)."""
        assert 0 <= self.kv_used_blocks == sum(self.kv_blocks.values())
        assert 0 <= self.adapter_bytes == sum(self.adapters.values())
        assert 0 <= self.used_bytes <= self.capacity_bytes
        assert 0 <= self.swap_used_blocks <= max(self.swap_capacity_blocks, 0)
