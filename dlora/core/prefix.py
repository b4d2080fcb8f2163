"""Block hashes for prefix caching (vLLM's automatic prefix caching; `MemoryPool`).

The hash of a request's block `i` names its content: the tokens of blocks 0..i and the adapter
(a salt, so that different adapters never share KV, whose values depend on the adapter's
weights). With token ids (live requests) it is chained over the ids of the prompt and of the
output generated so far, as vLLM does (blocks of output whose ids are unknown, as with a
scripted executor, are the request's own). A simulated request has no token ids: its first
`prefix_tokens` tokens are those of its `prefix_group` (a system prompt), so those blocks hash
by (adapter, group, index), and every other block is its own (request id, index). Full blocks
of output are hashed too, as vLLM caches them: a request preempted by recompute finds its own
prompt and output again while they are cached. The live executor registers the same hashes.
"""

from __future__ import annotations

from collections.abc import Hashable

from ..types import Request


def prompt_block_hashes(r: Request, block_tokens: int) -> tuple[Hashable, ...]:
    """Hashes of the request's full prompt blocks, in order (module docstring)."""
    return block_hashes(r, block_tokens, r.prompt_tokens)


def block_hashes(r: Request, block_tokens: int, tokens: int, start: int = 0) -> tuple[Hashable, ...]:
    """Hashes of the full blocks among the request's first `tokens` context tokens, in order
    (with token ids: as far as the ids are known), from block `start` on."""
    salt = -1 if r.adapter_id is None else r.adapter_id
    full = min(tokens, r.prompt_tokens + r.output_tokens) // block_tokens
    if r.prompt_token_ids is not None:
        ids = r.prompt_token_ids
        if tokens > len(ids) and r.output_token_ids:
            ids = ids + tuple(r.output_token_ids)
        out: list[Hashable] = []
        h: int = hash((-2, salt))
        known = min(tokens, len(ids)) // block_tokens
        for i in range(known):  # a chain: every block's hash needs the ones before it
            h = hash((h, ids[i * block_tokens:(i + 1) * block_tokens]))
            if i >= start:
                out.append(h)
        # output whose ids are not known (a scripted executor, or the simulator replaying a live
        # request): the request's own blocks, as for simulated requests
        out += [("r", r.id, i) for i in range(max(known, start), full)]
        return tuple(out)
    shared = r.prefix_tokens // block_tokens if r.prefix_group is not None else 0
    return tuple(("g", salt, r.prefix_group, i) if i < shared else ("r", r.id, i) for i in range(start, full))
