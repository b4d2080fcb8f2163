"""The host store of one replica: adapter id -> source (PEFT folder, `dlora.types.Adapter`
with a path, or a loaded `LoraAdapter`), validated host copies (CPU tensors) and the errors of
the invalid ones, so one bad adapter never stops the others from being served.

Host copies are an LRU cache when `capacity` is set (vLLM's `--max-cpu-loras`, "maximum number
of LoRAs to store in CPU memory"): registering is never refused; past the capacity the least
recently used copy read from a folder is dropped and read (and validated) again on its next
use. Sources given as loaded `LoraAdapter`s cannot be re-read and are never dropped.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from dlora.errors import AdapterError
from dlora.exec.adapters import LoraAdapter, load_adapter
from dlora.exec.loader import LlamaConfig
from dlora.types import Adapter

log = logging.getLogger(__name__)

AdapterSource = str | Path | Adapter | LoraAdapter


class AdapterStore:
    """Validated adapters in host memory, loaded on first use (or eagerly with `preload`)."""

    def __init__(
        self,
        config: LlamaConfig,
        dtype: torch.dtype,
        sources: Mapping[int, AdapterSource] | None = None,
        *,
        preload: bool = True,
        capacity: int | None = None,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError("the host adapter cache needs a capacity of at least 1 (or None)")
        self.config = config
        self.dtype = dtype
        self.capacity = capacity  # host copies kept (LRU); None: every registered adapter
        self._sources: dict[int, AdapterSource] = {}
        self._host: OrderedDict[int, LoraAdapter] = OrderedDict()  # least recently used first
        self.errors: dict[int, str] = {}  # adapter id -> why it cannot be served
        for aid, src in (sources or {}).items():
            self._sources[aid] = src
            if preload:
                try:
                    self.get(aid)
                except AdapterError as e:
                    log.error("%s (adapter id %d is disabled)", e, aid)

    def add(self, adapter_id: int, source: AdapterSource) -> LoraAdapter:
        """Register (or replace) an adapter and validate it now; raises `AdapterError`."""
        self.remove(adapter_id)
        self._sources[adapter_id] = source
        return self.get(adapter_id)

    def remove(self, adapter_id: int) -> None:
        self._sources.pop(adapter_id, None)
        self._host.pop(adapter_id, None)
        self.errors.pop(adapter_id, None)

    def is_valid(self, adapter_id: int) -> bool:
        if adapter_id not in self._sources:
            return False
        try:
            self.get(adapter_id)
        except AdapterError:
            return False
        return True

    def get(self, adapter_id: int) -> LoraAdapter:
        """The validated host copy; `AdapterError` if unknown or invalid."""
        if adapter_id in self._host:
            self._host.move_to_end(adapter_id)
            return self._host[adapter_id]
        if adapter_id in self.errors:
            raise AdapterError(self.errors[adapter_id])
        src = self._sources.get(adapter_id)
        if src is None:
            raise AdapterError(f"adapter id {adapter_id} is not registered with this executor")
        try:
            if isinstance(src, LoraAdapter):
                adapter = src
            elif isinstance(src, Adapter):
                if src.path is None:
                    raise AdapterError(
                        f"adapter {src.name!r} (id {adapter_id}) has no path to "
                        "a PEFT folder; set Adapter.path for live serving"
                    )
                adapter = load_adapter(src.path, self.config, name=src.name, dtype=self.dtype)
            else:
                adapter = load_adapter(src, self.config, dtype=self.dtype)
        except AdapterError as e:
            self.errors[adapter_id] = str(e)
            raise
        self._host[adapter_id] = adapter
        self._trim()
        return adapter

    @property
    def cached(self) -> tuple[int, ...]:
        """Ids whose validated copy is in host memory, least recently used first."""
        return tuple(self._host)

    def _trim(self) -> None:
        if self.capacity is None:
            return
        droppable = [i for i in self._host if not isinstance(self._sources.get(i), LoraAdapter)]
        while len(self._host) > self.capacity and droppable:
            aid = droppable.pop(0)
            del self._host[aid]
            log.debug("adapter %d dropped from the host cache (capacity %d)", aid, self.capacity)
