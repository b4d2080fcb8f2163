"""The grid of a measuring run (`dlora profile`): `Sweep` (what to vary), `QUICK`, the batches
it makes (`step_points`: prefill, decode, mixed prefill + decode, unmerged over 1..N adapters of
each rank; in each group every third interior point held out) and `Measured` (a point's median
seconds). No torch."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..types import BatchShape


@dataclass(frozen=True, slots=True)
class Sweep:
    """The grid of a profiling run (see `step_points` for the batches it makes)."""

    prefill_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    prefill_seqs: tuple[int, ...] = (1, 4)
    decode_seqs: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_context: tuple[int, ...] = (16, 64, 256, 512)
    num_adapters: tuple[int, ...] = (1, 2, 4)
    ranks: tuple[int, ...] = (4, 8, 16)
    transfer_tokens: tuple[int, ...] = (64, 256, 1024, 4096)
    repeats: int = 7
    warmup: int = 2

    def trimmed(self, max_batch_tokens: int | None = None, max_seqs: int | None = None,
                max_context: int | None = None) -> Sweep:
        def cut(xs: tuple[int, ...], hi: int | None) -> tuple[int, ...]:
            kept = tuple(x for x in xs if hi is None or x <= hi)
            return kept or (min(xs) if hi is None else hi,)

        return replace(self, prefill_tokens=cut(self.prefill_tokens, max_batch_tokens),
                       decode_seqs=cut(self.decode_seqs, max_seqs),
                       decode_context=cut(self.decode_context, max_context),
                       num_adapters=cut(self.num_adapters, max_seqs),
                       transfer_tokens=cut(self.transfer_tokens, max_context))


QUICK = Sweep(prefill_tokens=(16, 64, 128, 256, 512), decode_seqs=(1, 4, 8, 16),
              decode_context=(32, 128, 256), num_adapters=(1, 2, 4), ranks=(4, 16),
              transfer_tokens=(64, 256, 1024), repeats=5)


@dataclass(frozen=True, slots=True)
class StepPoint:
    """One batch of a sweep: items (computed tokens, new tokens, adapter id); `merged` is the
    merged adapter (merged mode) or None (unmerged)."""

    group: str  # prefill | decode | mixed | unmerged
    items: tuple[tuple[int, int, int | None], ...]
    merged: int | None
    held_out: bool = False


@dataclass(frozen=True, slots=True)
class Measured:
    """One step point's median seconds, its shape, and whether the fit left it out."""

    point: StepPoint
    shape: BatchShape
    seconds: float
    held_out: bool

def step_points(sweep: Sweep, ranks: dict[int, int]) -> list[StepPoint]:
    """The sweep's batches, grouped; in each group every third interior point is held out."""
    by_rank: dict[int, list[int]] = {}
    for aid, r in sorted(ranks.items()):
        by_rank.setdefault(r, []).append(aid)
    base = min(ranks)
    mid_ctx = sweep.decode_context[len(sweep.decode_context) // 2]
    mid_tokens = sweep.prefill_tokens[len(sweep.prefill_tokens) // 2]
    groups: dict[str, list[StepPoint]] = {"prefill": [], "decode": [], "mixed": [], "unmerged": []}
    for t in sweep.prefill_tokens:
        for s in sweep.prefill_seqs:
            if t // s >= 2:
                groups["prefill"].append(StepPoint("prefill", ((0, t // s, base),) * s, base))
    for s in sweep.decode_seqs:
        for c in sweep.decode_context:
            groups["decode"].append(StepPoint("decode", ((c, 1, base),) * s, base))
    mixed: dict[tuple[int, int, int], StepPoint] = {}  # prefill chunk beside decodes: contexts and batch sizes vary (the mixed terms)
    for t, s, c in ((mid_tokens, sweep.decode_seqs[-1], sweep.decode_context[0]),
                    (sweep.prefill_tokens[0], sweep.decode_seqs[len(sweep.decode_seqs) // 2],
                     sweep.decode_context[-1]),
                    (sweep.prefill_tokens[-1], sweep.decode_seqs[0], mid_ctx),
                    (mid_tokens, sweep.decode_seqs[-1], sweep.decode_context[-1]),
                    (sweep.prefill_tokens[0], sweep.decode_seqs[-1], mid_ctx),
                    (mid_tokens, sweep.decode_seqs[0], sweep.decode_context[-1])):
        mixed.setdefault((t, s, c), StepPoint("mixed", ((0, t, base), *((c, 1, base),) * s), base))
    groups["mixed"].extend(mixed.values())
    unmerged = groups["unmerged"]
    for n in sweep.num_adapters:
        for _, ids in sorted(by_rank.items()):
            use = ids[:n]
            for s in sorted({len(use), max(len(use), sweep.decode_seqs[-1])}):
                unmerged.append(StepPoint("unmerged", tuple((mid_ctx, 1, use[j % len(use)])
                                                            for j in range(s)), None))
            per = max(2, mid_tokens // len(use))
            unmerged.append(StepPoint("unmerged", tuple((0, per, a) for a in use), None))
    if len(by_rank) > 1:  # mixed ranks in one batch
        mix = [ids[0] for ids in by_rank.values()]
        unmerged.append(StepPoint("unmerged", tuple(
            (mid_ctx, 1, mix[j % len(mix)]) for j in range(max(len(mix), sweep.decode_seqs[-1]))),
            None))
    out = []
    for pts in groups.values():
        for i, p in enumerate(pts):
            hold = i % 3 == 1 and i != len(pts) - 1
            out.append(StepPoint(p.group, p.items, p.merged, hold))
    return out
