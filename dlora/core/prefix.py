"""Block hashes for prefix caching (vLLM's automatic prefix caching; `MemoryPool`).

The hash of a request's block `i` names its content: the tokens of blocks 0..i and the adapter
(a salt, so that different adapters never share KV, whose values depend on the adapter's
weights). With token ids (live requests) it is chained over them, as vLLM does. A simulated
request has no token ids: its first `prefix_tokens` tokens are those of its `prefix_group`
(a system prompt), so those blocks hash by (adapter, group, index), and the rest are its own
(request id, index), which still lets a preempted request find its own prompt again. Only full
blocks of the prompt are hashed.
"""

from __future__ import annotations

from collections.abc import Hashable

from ..types import Request


def prompt_block_hashes(r: Request, block_tokens: int) -> tuple[Hashable, ...]:
    """Hashes of the request's full prompt blocks, in order (module docstring)."""
    full = r.prompt_tokens // block_tokens
    if full == 0:
        return ()
    ids = r.prompt_token_ids
    salt = -1 if r.adapter_id is None else r.adapter_id
    if ids is not None:
        out: list[Hashable] = []
        h: int = hash((-2, salt))
        for i in range(full):
            h = hash((h, ids[i * block_tokens:(i + 1) * block_tokens]))
            out.append(h)
        return tuple(out)
    shared = r.prefix_tokens // block_tokens if r.prefix_group is not None else 0
    return tuple(("g", salt, r.prefix_group, i) if i < shared else ("r", r.id, i) for i in range(full))
