"""Fault isolation inside one step of `TorchExecutor` (a mixin of it, kept apart by concern).

Faults of one request fail that request alone (`StepResult.faults`), the rest of the batch runs:
prompt token ids outside the vocabulary are refused before anything reaches the device (on a
GPU an out-of-range index poisons the whole CUDA context); an adapter this executor cannot
serve (invalid, not registered) fails its requests and is blamed; a row of non-finite logits (an
adapter with huge weights) is not sampled and blames the request's adapter; a forward that
raises is re-run request by request after a probe (one base-model token through a scratch KV
block) shows the model itself still runs, so the request that raises alone is the one at
fault. An exception that escapes `execute`, or `StepResult.error`, is a fault of the replica.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from dlora.errors import DloraError
from dlora.exec.model import StepInputs, build_group
from dlora.types import Batch, BatchItem, Request, RequestFault, TokenLogprobs

if TYPE_CHECKING:
    from dlora.exec.adapter_store import AdapterStore
    from dlora.exec.kv_cache import PagedKVCache
    from dlora.exec.model import LlamaModel

log = logging.getLogger(__name__)


class RequestIsolation:
    if TYPE_CHECKING:  # provided by TorchExecutor
        model: LlamaModel
        device: torch.device
        kv: PagedKVCache
        store: AdapterStore
        _probe_pool: torch.Tensor | None
        _logprobs: dict[int, TokenLogprobs]

        def _sync(self) -> float: ...

        def _check_item(self, it: BatchItem, req: Request) -> None: ...

        def _prepare_kv(self, batch: Batch, it: BatchItem, req: Request) -> int: ...

        def _item_tokens(self, it: BatchItem, req: Request, start: int) -> list[int]: ...

        def _run(self, batch: Batch, run: list[int], new_ids: dict[int, list[int]],
                 starts: dict[int, int]) -> dict[int, int | None]: ...

        def _ends(self, req: Request, token: int) -> bool: ...

        def _register(self, req: Request, start: int) -> None: ...

    def _broken_adapters(self, batch: Batch) -> dict[int, str]:
        """Adapters the batch needs that this executor cannot serve (invalid, or not
        registered here): adapter id -> why. Their requests fail alone."""
        need = {it.adapter_id for it in batch.items if it.adapter_id is not None}
        need.update(batch.load_adapters)
        broken: dict[int, str] = {}
        for aid in need:
            try:
                self.store.get(aid)  # a dict look-up once loaded
            except DloraError as e:
                broken[aid] = str(e)
        return broken

    def _run_attributed(
        self, batch: Batch, broken: dict[int, str]
    ) -> tuple[
        tuple[int, ...],
        tuple[bool, ...],
        tuple[RequestFault, ...],
        tuple[TokenLogprobs | None, ...] | None,
    ]:
        """Run the batch; a request whose input, adapter or output is bad fails alone. The
        last element: each sampled token's log-probabilities where asked for (else None)."""
        self._logprobs.clear()
        faults: dict[int, RequestFault] = {}  # item index -> its fault
        new_ids: dict[int, list[int]] = {}
        starts: dict[int, int] = {}  # item index -> first position computed (prefix caching)
        vocab = self.model.config.vocab_size
        for j, (it, req) in enumerate(zip(batch.items, batch.requests, strict=True)):
            if it.adapter_id in broken:
                faults[j] = RequestFault(
                    req.id, f"its adapter cannot be served: {broken[it.adapter_id]}", it.adapter_id
                )
                continue
            self._check_item(it, req)
            starts[j] = self._prepare_kv(batch, it, req)
            ids = self._item_tokens(it, req, starts[j])
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                bad = next(t for t in ids if not 0 <= t < vocab)
                faults[j] = RequestFault(
                    req.id, f"prompt token id {bad} is outside the vocabulary [0, {vocab})"
                )
            else:
                new_ids[j] = ids
        run = list(new_ids)
        try:
            sampled = self._run(batch, run, new_ids, starts) if run else {}
        except DloraError:
            raise
        except Exception as exc:  # noqa: BLE001  (attributed below, or re-raised)
            sampled = self._isolate(batch, run, new_ids, starts, exc, faults)
        tokens: list[int] = []
        eos: list[bool] = []
        logprobs: list[TokenLogprobs | None] = []
        for j, (it, req) in enumerate(zip(batch.items, batch.requests, strict=True)):
            if not it.samples:
                continue
            token = sampled.get(j)
            if token is None and j not in faults:
                where = "the base model" if it.adapter_id is None else "its adapter"
                faults[j] = RequestFault(
                    req.id,
                    f"the logits are not finite (inf or nan) under {where}, whose weights are "
                    "likely broken",
                    it.adapter_id,
                )
            if j in faults:  # a placeholder the live driver discards with the request
                tokens.append(0)
                eos.append(False)
                logprobs.append(None)
                continue
            assert token is not None
            tokens.append(token)
            eos.append(self._ends(req, token))
            logprobs.append(self._logprobs.pop(req.id, None))
        for j in run:
            if j not in faults:
                self._register(batch.requests[j], starts[j])
        for f in faults.values():
            log.warning("replica %d step %d: request %d fails alone: %s",
                        batch.replica, batch.step, f.request_id, f.message)
        asked = any(lp is not None for lp in logprobs)
        return (
            tuple(tokens),
            tuple(eos),
            tuple(faults[j] for j in sorted(faults)),
            tuple(logprobs) if asked else None,
        )

    def _isolate(
        self,
        batch: Batch,
        run: list[int],
        new_ids: dict[int, list[int]],
        starts: dict[int, int],
        exc: Exception,
        faults: dict[int, RequestFault],
    ) -> dict[int, int | None]:
        """The forward of `run` raised `exc`: if the model still runs (`probe`), re-run each
        request alone and fail those that raise; otherwise the replica is at fault (re-raise)."""
        log.warning("replica %d step %d raised %s: %s; re-running its %d requests one by one",
                    batch.replica, batch.step, type(exc).__name__, exc, len(run))
        if not self.probe():
            raise exc
        sampled: dict[int, int | None] = {}
        for j in run:
            try:
                sampled.update(self._run(batch, [j], new_ids, starts))
            except Exception as e:  # noqa: BLE001  (this request's own fault)
                faults[j] = RequestFault(batch.requests[j].id, f"{type(e).__name__}: {e}")
        return sampled

    def probe(self) -> bool:
        """Whether the model still runs: one base-model token through a scratch KV block
        (the cache and the adapters are untouched)."""
        try:
            c, dev, bs = self.model.config, self.device, self.kv.block_size
            if self._probe_pool is None:
                self._probe_pool = torch.zeros(
                    (c.num_layers, 2, bs, c.num_kv_heads, c.head_dim),
                    dtype=self.model.dtype, device=dev,
                )
            zero = torch.zeros(1, dtype=torch.long, device=dev)
            step = StepInputs(zero, zero, zero, (build_group([(0, 0, 1, [0])], bs, dev),), bs)
            self.model.logits(self.model.forward(step, self._probe_pool))
            self._sync()
            return True
        except Exception:  # noqa: BLE001
            log.exception("replica probe failed: the replica itself is at fault")
            return False
