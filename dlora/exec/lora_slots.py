"""Adapters on the device: slots packed per (layer, module) for the batched LoRA kernels,
the per-iteration LoRA hook of unmerged mode, and merge / unmerge of one adapter into the base
weights (PAPER.md section 1).

Exact restore guarantee: the first time `merge` touches a base weight it copies that weight,
bytes unchanged, to `backup_device`; `unmerge` copies the saved bytes back (`copy_`, never a
subtraction). Base weights change only through `merge`, and only one adapter is merged at a
time, so every backup is the pristine original and any number of merge / unmerge cycles leaves
the weights bit for bit as loaded. Cost: one copy of each targeted weight on `backup_device`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dlora.errors import DloraError
from dlora.exec.adapters import LoraAdapter
from dlora.exec.model import FUSED_GROUPS, LlamaModel

_KERNELS: list[Any] = []


def _lora_apply() -> Any:
    """`dlora.kernels.lora_apply`, imported on first use (torch-only import path)."""
    if not _KERNELS:
        from dlora.kernels import lora_apply

        _KERNELS.append(lora_apply)
    return _KERNELS[0]


def _segments(per_token: Sequence[int]) -> tuple[list[int], list[int]]:
    """(seg_starts, seg_adapters) of the runs of equal values, as `make_segments` defines."""
    starts: list[int] = []
    adapters: list[int] = []
    for t, k in enumerate(per_token):
        if not adapters or adapters[-1] != k:
            starts.append(t)
            adapters.append(k)
    starts.append(len(per_token))
    return starts, adapters


class SlotsFullError(DloraError):
    """Every device adapter slot is taken."""


@dataclass(frozen=True, slots=True)
class PackedModule:
    """All resident adapters' weights of one (layer, fused group), in the kernel's layout."""

    a_packed: torch.Tensor  # (sum_r, d_in)
    bt_packed: torch.Tensor  # (sum_r, d_out)
    rank_offsets: torch.Tensor  # (K + 1,) int64
    scales: torch.Tensor  # (K,) float32
    max_rank: int


class AdapterSlots:
    """Device copies of resident adapters, packed per (layer, module) on demand."""

    def __init__(self, model: LlamaModel, capacity: int | None = None) -> None:
        self.model = model
        self.capacity = capacity
        self._resident: dict[int, LoraAdapter] = {}  # id -> adapter with device tensors
        self._packs: dict[tuple[int, str], PackedModule] | None = None
        self._index: dict[str, dict[int, int]] = {}  # module -> adapter id -> k

    @property
    def resident(self) -> tuple[int, ...]:
        return tuple(self._resident)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._resident

    def get(self, adapter_id: int) -> LoraAdapter:
        return self._resident[adapter_id]

    def load(self, adapter_id: int, adapter: LoraAdapter) -> None:
        """Copy a host adapter into a device slot (no-op if resident)."""
        if adapter_id in self._resident:
            return
        if self.capacity is not None and len(self._resident) >= self.capacity:
            raise SlotsFullError(
                f"all {self.capacity} adapter slots are full; the batch must "
                f"evict an adapter before loading adapter {adapter_id}"
            )
        dev, dtype = self.model.device, self.model.dtype
        modules = {
            key: type(m)(a=m.a.to(dev, dtype), b=m.b.to(dev, dtype), scale=m.scale)
            for key, m in adapter.modules.items()
        }
        self._resident[adapter_id] = LoraAdapter(
            name=adapter.name,
            rank=adapter.rank,
            target_modules=adapter.target_modules,
            modules=modules,
            path=adapter.path,
        )
        self._packs = None

    def evict(self, adapter_id: int) -> None:
        if self._resident.pop(adapter_id, None) is not None:
            self._packs = None

    def packs(self) -> dict[tuple[int, str], PackedModule]:
        """Packed weights per (layer, fused group); rebuilt only after a load or evict.

        An adapter's rows in a fused group stack its member modules: A rows are the members'
        `A`s, `B^T` rows are `scale * B^T` placed at the member's output columns (zeros
        elsewhere), so one kernel call covers q, k and v (or gate and up) with per-module
        ranks and scales; the kernel's own `scales` are then all 1. An adapter that adapts none
        of the group's modules in a layer (PEFT's layers_to_transform / exclude_modules) gets
        one zero row there."""
        if self._packs is not None:
            return self._packs
        cfg, dev, dtype = self.model.config, self.model.device, self.model.dtype
        packs: dict[tuple[int, str], PackedModule] = {}
        self._index = {}
        for group, members in FUSED_GROUPS.items():
            ids = [
                i for i, a in self._resident.items() if any(m in a.target_modules for m in members)
            ]
            self._index[group] = {aid: k for k, aid in enumerate(ids)}
            if not ids:
                continue
            columns, start = {}, 0
            for m in members:
                columns[m] = (start, start + cfg.module_shape(m)[0])
                start += cfg.module_shape(m)[0]
            for layer in range(cfg.num_layers):
                a_rows: list[torch.Tensor] = []
                bt_rows: list[torch.Tensor] = []
                offsets = [0]
                for aid in ids:
                    adapter = self._resident[aid]
                    rank = 0
                    for m in members:
                        mod = adapter.modules.get((layer, m))
                        if mod is None:  # not adapted in this layer (layers_to_transform, ...)
                            continue
                        bt = torch.zeros(mod.rank, start, dtype=dtype, device=dev)
                        bt[:, columns[m][0] : columns[m][1]] = mod.b.t() * mod.scale
                        a_rows.append(mod.a)
                        bt_rows.append(bt)
                        rank += mod.rank
                    if rank == 0:  # one zero row: every kernel sees rank >= 1, the delta is 0
                        a_rows.append(torch.zeros(1, cfg.module_shape(members[0])[1], dtype=dtype,
                                                  device=dev))
                        bt_rows.append(torch.zeros(1, start, dtype=dtype, device=dev))
                        rank = 1
                    offsets.append(offsets[-1] + rank)
                packs[(layer, group)] = PackedModule(
                    a_packed=torch.cat(a_rows).contiguous(),
                    bt_packed=torch.cat(bt_rows).contiguous(),
                    rank_offsets=torch.tensor(offsets, dtype=torch.int64, device=dev),
                    scales=torch.ones(len(ids), dtype=torch.float32, device=dev),
                    max_rank=max(b - a for a, b in zip(offsets, offsets[1:], strict=False)),
                )
        self._packs = packs
        return packs

    def hook(
        self, adapter_per_token: Sequence[int | None], backend: str | None = None
    ) -> LoraBatchHook | None:
        """The LoRA side path for one iteration whose tokens use these adapters (None: base).
        Tokens of one adapter should be contiguous (segments are runs of equal adapters)."""
        packs = self.packs()
        dev = self.model.device
        segments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        seen: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, torch.Tensor] | None] = {}
        for group, index in self._index.items():
            key = tuple(index.items())  # groups with the same adapters share segments
            if key not in seen:
                per_token = [-1 if a is None else index.get(a, -1) for a in adapter_per_token]
                starts, adapters = _segments(per_token)
                seen[key] = (
                    (
                        torch.tensor(starts, dtype=torch.int32, device=dev),
                        torch.tensor(adapters, dtype=torch.int32, device=dev),
                    )
                    if any(k >= 0 for k in adapters)
                    else None
                )
            if seen[key] is not None:
                segments[group] = seen[key]  # type: ignore[assignment]
        return LoraBatchHook(packs, segments, backend) if segments else None


class LoraBatchHook:
    """Adds `scale_k * B_k A_k x` per token through `dlora.kernels.lora_apply`."""

    def __init__(
        self,
        packs: dict[tuple[int, str], PackedModule],
        segments: dict[str, tuple[torch.Tensor, torch.Tensor]],
        backend: str | None = None,
    ) -> None:
        self._packs = packs
        self._segments = segments
        self._lora_apply = _lora_apply()
        self._backend = backend

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> None:
        seg = self._segments.get(group)
        if seg is None:
            return
        p = self._packs[(layer, group)]
        self._lora_apply(
            x,
            y,
            p.a_packed,
            p.bt_packed,
            p.rank_offsets,
            seg[0],
            seg[1],
            p.scales,
            backend=self._backend,
            max_rank=p.max_rank,
        )


class MergeState:
    """Which adapter is folded into the base weights, and the pristine backups."""

    def __init__(self, model: LlamaModel, backup_device: str | torch.device = "cpu") -> None:
        self.model = model
        self.backup_device = torch.device(backup_device)
        self.merged: int | None = None
        self._merged_keys: tuple[tuple[int, str], ...] = ()
        self._backups: dict[tuple[int, str], torch.Tensor] = {}

    def merge(self, adapter_id: int, adapter: LoraAdapter) -> None:
        """W <- W + scale * B @ A for every module the adapter targets (computed in float32)."""
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged} is merged; unmerge it first")
        for key, m in adapter.modules.items():
            w = self.model.weight(*key)
            if key not in self._backups:
                self._backups[key] = w.to(self.backup_device, copy=True)
            a = m.a.to(w.device, torch.float32)
            b = m.b.to(w.device, torch.float32)
            if w.dtype == torch.float32:
                w.addmm_(b, a, alpha=m.scale)
            else:
                w.copy_(torch.addmm(w.float(), b, a, alpha=m.scale))
        self.merged = adapter_id
        self._merged_keys = tuple(adapter.modules)

    def unmerge(self) -> int | None:
        """Restore the saved original bytes of every weight the merged adapter touched."""
        merged = self.merged
        for key in self._merged_keys:
            self.model.weight(*key).copy_(self._backups[key])
        self.merged = None
        self._merged_keys = ()
        return merged
