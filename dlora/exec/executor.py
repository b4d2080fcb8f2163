"""TorchExecutor: runs one `Batch` on the real model and returns a measured `StepResult`.

One instance per replica, no global state. `execute` first applies the batch's memory actions
(free, evict, load, swap, unmerge / merge), then one forward over the flattened tokens of all
items: merged mode runs the base weights with the merged adapter folded in; unmerged mode runs
the clean base weights plus each token's LoRA side path through `dlora.kernels` (PAPER.md
section 1). Items with `samples=True` get one sampled token each.

Faults of one request fail that request alone, the rest of the batch runs (`isolation.py`).

Prefix caching (`kv_cache.py`): an item that says `computed_tokens = k * block_size` for a
request without KV here claims the cached blocks of its first k block hashes (chained over
its prompt and output ids: `dlora.core.prefix.block_hashes`, the core's function); after each
step the blocks that became full are registered under their hashes, as the core registers them
in its memory pool. Should the two disagree (a restarted replica, a failed step), the tokens the batch
calls computed but this cache lacks are computed in the step, before the item's own tokens:
a cache miss costs time, never correctness.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping
from pathlib import Path

import torch

from dlora.core.prefix import block_hashes
from dlora.errors import DloraError
from dlora.exec.adapter_store import AdapterSource, AdapterStore
from dlora.exec.adapters import LoraAdapter
from dlora.exec.isolation import RequestIsolation
from dlora.exec.kv_cache import PagedKVCache
from dlora.exec.lora_slots import AdapterSlots, MergeState
from dlora.exec.model import LlamaModel, StepInputs, build_group
from dlora.exec.sampling import sample, token_logprobs
from dlora.types import (
    Batch,
    BatchItem,
    BatchMode,
    Request,
    StepResult,
    TokenLogprobs,
)

log = logging.getLogger(__name__)


def _adapter_order(adapter_id: int | None) -> int:
    return -1 if adapter_id is None else adapter_id


class StepError(DloraError):
    """The batch cannot run as given; reported in `StepResult.error`."""


class TorchExecutor(RequestIsolation):
    """The real executor of one replica.

    `model`: a Hugging Face Llama folder or a loaded `LlamaModel`. `adapters`: adapter id ->
    PEFT folder, `dlora.types.Adapter` with a path, or a loaded `LoraAdapter`. Invalid adapters are logged and remembered
    (`adapter_errors`); batches that use them fail with that message while the rest is served.
    KV: `num_kv_blocks` blocks of `block_size` tokens (default 1024 blocks).
    `max_device_adapters`: slot capacity (None: unbounded). `max_host_adapters`: host copies kept
    (an LRU cache, vLLM's --max-cpu-loras; None: all). `merge_backup`: where pristine copies
    of merged weights live, "device" (fast switches) or "host" (saves device memory).
    `prefix_caching`: register computed prompt blocks and claim them for items that say they
    are computed (module docstring); off, such items are computed in full.
    """

    def __init__(
        self,
        model: str | Path | LlamaModel,
        adapters: Mapping[int, AdapterSource] | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        block_size: int = 16,
        num_kv_blocks: int = 1024,
        max_device_adapters: int | None = None,
        merge_backup: str = "device",
        seed: int = 0,
        lora_backend: str | None = None,
        preload_adapters: bool = True,
        max_host_adapters: int | None = None,
        prefix_caching: bool = True,
    ) -> None:
        self.model = (
            model
            if isinstance(model, LlamaModel)
            else LlamaModel.from_folder(model, device=device, dtype=dtype)
        )
        c = self.model.config
        self.device = self.model.device
        self.kv = PagedKVCache(
            num_layers=c.num_layers,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            num_blocks=num_kv_blocks,
            block_size=block_size,
            dtype=self.model.dtype,
            device=self.device,
        )
        self.slots = AdapterSlots(self.model, max_device_adapters)
        self.merge_state = MergeState(
            self.model, self.device if merge_backup == "device" else "cpu"
        )
        self.seed = seed
        self.lora_backend = lora_backend
        self.store = AdapterStore(
            self.model.config, self.model.dtype, adapters, preload=preload_adapters,
            capacity=max_host_adapters,
        )
        self.adapter_errors = self.store.errors  # adapter id -> why it cannot be served
        self.last_logits: torch.Tensor | None = None  # (sampling items, vocab) of the last step
        self._probe_pool: torch.Tensor | None = None  # one scratch KV block for `probe`
        self._logprobs: dict[int, TokenLogprobs] = {}  # request id -> this step's, if asked for
        self.prefix_caching = prefix_caching
        self.prefix_hit_tokens = 0  # tokens claimed from the prefix cache
        self.prefix_missed_tokens = 0  # tokens a batch called computed that were computed here

    # ---- adapters ----
    def register_adapter(self, adapter_id: int, source: AdapterSource) -> LoraAdapter:
        """Add (or replace) an adapter at run time; raises `AdapterError` if it is invalid."""
        self.unregister_adapter(adapter_id)
        return self.store.add(adapter_id, source)

    def unregister_adapter(self, adapter_id: int) -> None:
        if self.merge_state.merged == adapter_id:
            self.merge_state.unmerge()
        self.slots.evict(adapter_id)
        self.store.remove(adapter_id)
        self.kv.forget_salt(adapter_id)  # KV cached under this id is stale for any new weights

    def has_adapter(self, adapter_id: int) -> bool:
        """Whether this executor can serve the adapter (registered and valid)."""
        return self.store.is_valid(adapter_id)

    @property
    def resident_adapters(self) -> tuple[int, ...]:
        return self.slots.resident

    @property
    def merged_adapter(self) -> int | None:
        return self.merge_state.merged

    def _host_adapter(self, adapter_id: int) -> LoraAdapter:
        return self.store.get(adapter_id)

    def load_to_device(self, adapter_id: int) -> None:
        """Put adapter `adapter_id` from the host store into a device slot."""
        self.slots.load(adapter_id, self._host_adapter(adapter_id))

    def _switch(self, batch: Batch) -> None:
        ms = self.merge_state
        if batch.unmerge_adapter is not None and ms.merged is not None:
            if ms.merged != batch.unmerge_adapter:
                log.warning(
                    "batch unmerges adapter %s but %s is merged", batch.unmerge_adapter, ms.merged
                )
            ms.unmerge()
        want = batch.merged_adapter if batch.mode == BatchMode.MERGED else None
        if batch.merge_adapter is not None and batch.merge_adapter != want:
            raise StepError(
                f"batch merges adapter {batch.merge_adapter} but runs {batch.mode} "
                f"with merged adapter {want}"
            )
        if ms.merged != want:
            if batch.merge_adapter is None and batch.unmerge_adapter is None:
                log.warning("merged state is %s but the batch needs %s; switching", ms.merged, want)
            if ms.merged is not None:
                ms.unmerge()
            if want is not None:
                src = self.slots.get(want) if want in self.slots else self._host_adapter(want)
                ms.merge(want, src)

    # ---- KV ----
    @property
    def kv_capacity_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def kv_free_blocks(self) -> int:
        return self.kv.free_blocks

    def export_kv(self, request_id: int) -> torch.Tensor:
        """The request's KV, CPU tensor (layers, 2, tokens, kv_heads, head_dim)."""
        return self.kv.export(request_id)

    def import_kv(self, request_id: int, kv: torch.Tensor) -> None:
        self.kv.import_(request_id, kv)

    def free_request(self, request_id: int) -> None:
        self.kv.free(request_id)

    # ---- prefix caching ----
    def _hashes(self, req: Request, tokens: int) -> tuple[Hashable, ...]:
        """Hashes of the full blocks of the request's first `tokens` context tokens (prompt and
        output ids; the core's function, so both sides name blocks alike)."""
        return block_hashes(req, self.kv.block_size, tokens)

    def _prepare_kv(self, batch: Batch, it: BatchItem, req: Request) -> int:
        """Make the request's KV agree with the item; returns the first position this step
        computes: `it.computed_tokens`, or fewer where this cache lacks some of them."""
        rid, computed, kv = it.request_id, it.computed_tokens, self.kv
        have = kv.lengths.get(rid, 0)
        if have > computed:  # the core counts fewer: drop the rest (shared blocks are copied)
            kv.truncate(rid, computed)
            have = computed
        bs = kv.block_size
        if have == 0 and computed >= bs and self.prefix_caching and not kv.is_swapped(rid):
            have = kv.claim(rid, self._hashes(req, computed))
            self.prefix_hit_tokens += have
        if have < computed:
            log.debug("replica %d step %d: request %d: KV of tokens %d..%d is not here (the prefix "
                      "cache and the scheduler's books differ); computing them in this step",
                      batch.replica, batch.step, rid, have, computed)
            self.prefix_missed_tokens += computed - have
        return have

    def _register(self, req: Request, start: int) -> None:
        """After a step that computed tokens from `start`: share the blocks that became full."""
        if not self.prefix_caching:
            return
        length = self.kv.lengths.get(req.id, 0)
        full = length // self.kv.block_size
        if full > start // self.kv.block_size and full > self.kv.shared_blocks.get(req.id, 0):
            self.kv.register(req.id, self._hashes(req, length), req.adapter_id)

    # ---- the step ----
    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def execute(self, batch: Batch) -> StepResult:
        start = self._sync()
        switch_s = load_s = swap_s = 0.0
        try:
            for rid in batch.free_requests:
                self.free_request(rid)
            t = self._sync()
            for aid in batch.evict_adapters:
                self.slots.evict(aid)
            broken = self._broken_adapters(batch)
            for aid in batch.load_adapters:
                if aid not in broken:
                    self.load_to_device(aid)
            if batch.mode == BatchMode.UNMERGED:
                for aid in {it.adapter_id for it in batch.items if it.adapter_id is not None}:
                    if aid not in self.slots and aid not in broken:
                        log.debug("adapter %s used without a load action; loading", aid)
                        self.load_to_device(aid)
            t, load_s = self._sync(), time.perf_counter() - t
            for rid in batch.swap_out:
                self.kv.swap_out(rid)
            for rid in batch.swap_in:
                self.kv.swap_in(rid)
            t, swap_s = self._sync(), time.perf_counter() - t
            if batch.merged_adapter in broken:  # every item fails; leave the weights clean
                if self.merge_state.merged is not None:
                    self.merge_state.unmerge()
            else:
                self._switch(batch)
            t, switch_s = self._sync(), time.perf_counter() - t
            tokens, eos, faults, logprobs = (
                self._run_attributed(batch, broken) if batch.items else ((), (), (), None)
            )
        except DloraError as e:
            log.error("replica %d step %d failed: %s", batch.replica, batch.step, e)
            return StepResult(
                elapsed_s=self._sync() - start,
                switch_s=switch_s,
                load_s=load_s,
                swap_s=swap_s,
                error=str(e),
            )
        return StepResult(
            elapsed_s=self._sync() - start,
            switch_s=switch_s,
            load_s=load_s,
            swap_s=swap_s,
            token_ids=tokens,
            eos=eos,
            faults=faults,
            logprobs=logprobs,
        )

    def _run(
        self, batch: Batch, run: list[int], new_ids: dict[int, list[int]], starts: dict[int, int]
    ) -> dict[int, int | None]:
        """One forward over items `run` (indexes into the batch; their token ids, from
        position `starts[j]`, in `new_ids`): item index -> sampled token of each sampling
        item, None where its logits are not finite."""
        unmerged = batch.mode == BatchMode.UNMERGED
        order = list(run)
        if unmerged:  # tokens of one adapter contiguous: one kernel segment per adapter
            order.sort(key=lambda j: _adapter_order(batch.items[j].adapter_id))
        ids: list[int] = []
        positions: list[int] = []
        slot_map: list[int] = []
        per_token: list[int | None] = []
        decode: list[tuple[int, int, int, list[int]]] = []
        prefill: list[tuple[int, int, int, list[int]]] = []
        last: dict[int, int] = {}  # item index -> flat index of its last token
        for j in order:
            it = batch.items[j]
            start, end = starts[j], it.computed_tokens + it.new_tokens
            self.kv.reserve(it.request_id, end)
            span = (len(ids), start, end - start, self.kv.tables[it.request_id])
            (decode if end - start == 1 else prefill).append(span)
            ids.extend(new_ids[j])
            positions.extend(range(start, end))
            slot_map.extend(self.kv.slots(it.request_id, start, end))
            per_token.extend([it.adapter_id if unmerged else None] * (end - start))
            last[j] = len(ids) - 1
        dev = self.device
        step = StepInputs(
            token_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slot_map, dtype=torch.long, device=dev),
            groups=tuple(build_group(g, self.kv.block_size, dev) for g in (decode, prefill) if g),
            block_size=self.kv.block_size,
        )
        hook = self.slots.hook(per_token, self.lora_backend) if unmerged else None
        hidden = self.model.forward(step, self.kv.pool, hook)
        for j in run:
            it = batch.items[j]
            self.kv.mark_written(it.request_id, it.computed_tokens + it.new_tokens)
        sampling = [j for j in sorted(run) if batch.items[j].samples]
        if not sampling:
            return {}
        logits = self.model.logits(hidden[torch.tensor([last[j] for j in sampling], device=dev)])
        self.last_logits = logits
        finite = torch.isfinite(logits).all(-1)
        if not bool(finite.all()):  # sample the finite rows only
            keep = [k for k, ok in enumerate(finite.tolist()) if ok]
            out: dict[int, int | None] = {j: None for j in sampling}
            if keep:
                rows = torch.tensor(keep, device=dev)
                sub = self._sample(logits[rows], [batch.requests[sampling[k]] for k in keep])
                out.update({sampling[k]: t for k, t in zip(keep, sub, strict=True)})
            return out
        tokens = self._sample(logits, [batch.requests[j] for j in sampling])
        return dict(zip(sampling, tokens, strict=True))

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        tokens = sample(
            logits,
            [r.sampling for r in reqs],
            [self._seed(r) for r in reqs],
            [len(r.output_token_ids) for r in reqs],
            histories=[(r.prompt_token_ids or (), r.output_token_ids) for r in reqs],
        )
        for i, (r, token) in enumerate(zip(reqs, tokens, strict=True)):
            if r.sampling is not None and r.sampling.logprobs is not None:
                self._logprobs[r.id] = token_logprobs(logits[i], token, r.sampling.logprobs)
        return tokens

    def _seed(self, req: Request) -> int:
        if req.sampling is not None and req.sampling.seed is not None:
            return req.sampling.seed
        return self.seed * 1_000_003 + req.id

    def _check_item(self, it: BatchItem, req: Request) -> None:
        if req.prompt_token_ids is None:
            raise StepError(f"request {req.id} has no prompt_token_ids; live mode needs tokens")
        if req.id != it.request_id:
            raise StepError(f"batch item {it.request_id} is paired with request {req.id}")

    def _item_tokens(self, it: BatchItem, req: Request, start: int) -> list[int]:
        """Token ids of positions `start` .. the item's end (`start` <= its computed tokens:
        the KV it lacks here is computed too)."""
        prompt, output = req.prompt_token_ids, req.output_token_ids
        assert prompt is not None
        end = it.computed_tokens + it.new_tokens
        if it.new_tokens < 1 or end > len(prompt) + len(output):
            raise StepError(
                f"request {req.id}: tokens {start}..{end} requested but its context has "
                f"{len(prompt) + len(output)}"
            )
        p = len(prompt)  # only the slice this step needs (no copy of the whole context)
        return list(prompt[start:end]) + list(output[max(0, start - p) : max(0, end - p)])

    def _ends(self, req: Request, token: int) -> bool:
        """Whether `token` ends the request: a stop token, EOS (unless ignore_eos), or the
        request's output_tokens reached."""
        if len(req.output_token_ids) + 1 >= req.output_tokens:
            return True
        sp = req.sampling
        if sp is not None and token in sp.stop_token_ids:
            return True
        ignore = sp.ignore_eos if sp is not None else True
        return not ignore and token in self.model.config.eos_token_ids
