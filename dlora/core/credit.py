"""dLoRA's credit-based dynamic batching (PAPER.md section 2): every iteration, run one adapter
merged into the base weights or many adapters unmerged, without starving anyone.

Per iteration, over the replica's unfinished requests in FCFS order:

- `B_fcfs` = the first `max_batch_size` requests; `R[k]` = adapter k's requests.
- Service (the starvation guard): once an adapter's credit reaches `credit_fire`, it and every
  other adapter with credit >= `credit_release` are served first, unmerged: their requests in
  FCFS order, then the rest of FCFS. Each stays served until its credit drops below
  `credit_release` (hysteresis); settling all creditors at once saves switch round trips.
- Otherwise, with `m` = the adapter with most requests among the eligible ones (credit >=
  `credit_floor`; one that fell below it is benched until its credit is back at
  `credit_start`) and `a` the adapter merged now: stay merged on `a` while `|R[a]| >= merge_left * |B_fcfs|`;
  else merge `m` when `|R[m]| >= merge_right * |B_fcfs|` (batch: the first `max_batch_size` of
  `R[m]`); else run `B_fcfs` unmerged.

Credits are zero-sum: each request of `B_fcfs` that a merged batch on `a` skips moves
`credit_per_skip` from `a` to the skipped request's adapter; each request of a served adapter in
a service batch moves `credit_per_skip` back, first to the adapters of the `B_fcfs` requests it
displaced, the rest to the adapter with the lowest credit. A plain FCFS iteration serves every
adapter in `B_fcfs` in order, so it settles debts: the lowest adapter below `credit_start` with
requests in `B_fcfs` gets `credit_per_skip` per such request from the highest one above it
(never past `credit_start`). Without this, an adapter merged into debt would stay benched.

Starvation bound. Let `s = credit_per_skip`, `B = max_batch_size`. Credits stay within
`[min(credit_floor, credit_release) - s*B, credit_fire + s*B]` (an adapter pays only while
eligible, served or above `credit_start`, and gains only while below `credit_fire`). A request
`r` of adapter `k` that is in `B_fcfs` and not run gains `k` at least `s` (a merged batch
skipped it, or a service batch displaced it), while `k` loses credit only in iterations that run
`r`; once `k`'s credit reaches `credit_fire`, `r` runs in every iteration. So, up to the
replica's memory and token caps, `r` goes without running at most

    W = ceil((credit_fire - min(credit_floor, credit_release)) / s) + B

consecutive iterations while in `B_fcfs`. `starvation_bound()` returns W. By default the
credit thresholds are dormant (fire 1e9, floor -1e9): the wait trigger below is the guard.

The wait trigger (`max_skip_s`, default 30 s of simulated time) bounds the same wait in
seconds: a request of `B_fcfs` that the policy's plans leave out keeps a skip clock (started at
the first plan that skipped it, cleared by any plan that includes it); once it reads
`max_skip_s`, its adapter is served first, unmerged, for that one iteration (no hysteresis: the
request runs, its clock restarts), and the next plan judges staying on the adapter that was
merged before the service as if it were still merged (the service interrupts a merged run, it
does not end it; forced iterations take no part in AIMD's episodes). So a request at the head of the queue (in `B_fcfs`) goes
without being planned for at most

    max_skip_s + one iteration (the one in flight when the clock passes max_skip_s)

seconds, up to the replica's memory and token caps; `starvation_bound_s(iteration_s)` returns
it (`stats()["max_skip_wait_s"]` is the longest skip seen).

Defaults, chosen by measurement on the Fig. 10 scenario (`dlora simulate`, 400 requests, mean
latency per token against a fully dormant guard: fire 1e12, floor -1e12, no wait trigger):
- the old credit defaults (fire 128, floor -256) cost +27% / +26% / +25% at alpha 0 / 1 / 3
  (forced service every ~9 merged iterations, then as long an unmerged stretch); fire 1024 with
  floor -256 +9-17% (the floor benches the hot adapter and forces switches). So the credit
  thresholds are dormant by default (fire 1e9, floor -1e9; set them to use credits).
- the wait trigger with credit-style hysteresis (served until the credit is paid back) cost
  +11-16% at 15 s and +1-8% even at 60 s: the long forced stretch is the price.
- the wait trigger serving one iteration, 15 s, before the resume below: over seeds 0-3, mean
  +0.8% / +1.2% / +0.4% / +2.9% / +4.0% / +1.1% at alpha 0 / 0.5 / 1 / 1.5 / 2 / 3; seed 0 at
  alpha 2 +12% (insensitive to max_skip_s 15-60). Cause, measured there: the guard fired 10 times
  in 400 requests and its forced iterations cost 0.4 s of switches in 195 s busy (busy time was
  the same as the dormant guard's); what cost was the plan after the first firing. The service
  iteration leaves the replica unmerged, so the next plan saw no merged adapter to stay on
  (`merge_left`) and entered the adapter with the most queued requests (`merge_right`): the
  backlogged second adapter, for 832 iterations, while the hot adapter (249 of 400 requests)
  waited; its mean latency per token went 0.040 -> 0.085 s.
- so a forced service interrupts a merged run instead of ending it: the next plan judges staying
  on the adapter merged before the service (`_Decision.resume`), and forced iterations neither
  end nor start an AIMD episode. Seeds 0-2 against a dormant guard (`dlora simulate`, both runs
  the same seed), alpha 0 / 1 / 2 / 3, per seed:
  15 s, modern profile: +4.9 -2.4 +1.2 / +1.8 +0.2 -0.2 / +0.9 +0.9 +0.9 / +1.2 +1.1 +0.9%;
  15 s, artifact profile: +3.7 +1.9 +4.0 / +2.4 +0.9 +4.4 / +0.9 +1.1 +0.0 / 0 0 0%;
  30 s, modern: +0.7 -0.8 +0.9 / +1.3 -0.1 +0.8 / +0.4 +0.4 +0.5 / +0.8 +0.7 +0.5%;
  30 s, artifact: +2.0 +1.1 +1.0 / +0.8 +0.4 +1.5 / +0.7 +0.9 +0.0 / 0 0 0%.
  So the default is 30 s: no cell above 2%. At 15 s the price is the service iterations
  themselves on an overloaded replica at low skew (alpha 0 seed 0: 21 of them, 42 extra
  switches, +1% busy time), one every 15 s because some B_fcfs request of another adapter is
  always starving there. The fully dormant guard let a head-of-queue request go unplanned for
  61 / 105 / 113 / 126 / 138 / 145 s at alpha 0 / 0.5 / 1 / 1.5 / 2 / 3 (seed 0); the default
  caps it at 30 s
  (tests/core/test_credit.py: test_wait_trigger_bounds_a_starved_request_in_seconds,
  test_forced_service_resumes_the_merged_adapter). What the bound is not: a request admitted by
  a service iteration and then skipped again by merged plans gets one iteration per max_skip_s;
  it bounds the gap between iterations a starved request runs, not its completion time.
The artifact's scale (start 1e4 (N-1), fire 1e4 N) waited for minutes.

Adaptive thresholds (AIMD): at every episode boundary (a change of mode or merged adapter) the
ended episode is judged by counterfactual throughput: each iteration counts the batch a merged
policy (on the adapter it would merge) and plain FCFS would have formed, timed by the profile at
a reference context (`reference_context_tokens`), plus the switch cost paid entering the episode
or that the other side would have paid. Merged and merging won: `merge_right -= 0.05` (not below
`merge_left`), else `merge_right *= 1.1`; unmerged and FCFS won: `merge_left += 0.05` (not above
`merge_right`), else `merge_left /= 1.1`. Thresholds start from the profile: `merge_right = 1`,
`merge_left = t_merged / t_unmerged` at `max_batch_size` sequences.

`plan` reads state only; it memoises the facts of its decision (which `observe` applies to the
credits and counters), so calling it twice for the same queue changes nothing.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import Any, NamedTuple

from ..config import spec
from ..errors import ConfigError
from ..types import BatchMode, Request
from .batching import BATCH_POLICIES, Plan, PolicyBase, PolicyContext, QueueView
from .credit_aimd import AimdThresholds, Key, _Episode
from .credit_repeat import CreditRepeats
from .credit_wait import WaitTrigger

TRAJECTORY_LIMIT = 256


@dataclass(frozen=True, slots=True)
class CreditParams:
    credit_start: float = spec(0.0, doc="every adapter's credit at start (credits are zero-sum)")
    credit_fire: float = spec(1e9, doc="credit at which an adapter is served first (dormant by "
                              "default: fire 128 cost 25-27% latency on Fig. 10; module docstring)")
    credit_release: float = spec(0.0, doc="served adapters stay served down to this credit")
    credit_floor: float = spec(-1e9, doc="adapters below this credit are not merge candidates "
                               "(dormant by default: -256 cost 9-17% on Fig. 10)")
    credit_per_skip: float = spec(1.0, gt=0.0, doc="credit moved per skipped request")
    max_skip_s: float | None = spec(30.0, gt=0.0, doc="serve an adapter once a request of it in B_fcfs "
                                    "has been skipped this many seconds in a row (None: credits only)")
    aimd: bool = spec(True, doc="tune the thresholds at episode boundaries")
    aimd_add: float = spec(0.05, gt=0.0, lt=1.0)
    aimd_factor: float = spec(1.1, gt=1.0)
    merge_right_init: float = spec(1.0, gt=0.0, doc="initial merge_right (the artifact's 1.0)")
    merge_right_max: float = spec(4.0, gt=0.0, doc="cap on merge_right after AIMD increases")
    merge_left_min: float = spec(0.05, gt=0.0, doc="floor on merge_left after AIMD decreases")
    reference_context_tokens: int = spec(512, ge=1, doc="context used for profile timings")

    def validate(self, path: str) -> None:
        if not self.credit_floor <= self.credit_release < self.credit_fire:
            raise ConfigError(f"{path}: need credit_floor <= credit_release < credit_fire, got "
                              f"{self.credit_floor}, {self.credit_release}, {self.credit_fire}")
        if not self.credit_floor < self.credit_start < self.credit_fire:
            raise ConfigError(f"{path}.credit_start: must lie in (credit_floor, credit_fire), "
                              f"got {self.credit_start}")


class _Decision(NamedTuple):
    """What `plan` decided and why; `observe` applies it (an immutable value, built once per
    decision: a named tuple builds several times faster than a frozen dataclass)."""

    step: int
    mode: BatchMode
    adapter: Key  # merged adapter (merged plans)
    forced: bool
    transfers: tuple[tuple[Key, Key, float], ...]  # (payer, payee, amount)
    serving: frozenset[Key]
    merged_cf: int  # batch size a merged policy would form
    merged_cf_adapter: Key
    fcfs_n: int
    fcfs_adapters: int
    fcfs_rank_tokens: int  # sum of ranks over B_fcfs requests (one decode token each)
    resume: Key = None  # forced plans: the adapter merged when service began, to stay on after it


class _QueueFacts(NamedTuple):
    """The queue's side of a decision (`CreditPolicy._queue_facts`)."""

    fcfs: tuple[Request, ...]  # B_fcfs: the first max_batch_size requests
    counts: Counter[Key]  # requests per adapter, the whole queue
    in_fcfs: Counter[Key]  # requests per adapter in B_fcfs
    by_count: tuple[int, ...]  # the queue's adapters, most requests first (ties: lowest id)
    fcfs_adapters: int  # adapters in B_fcfs (the base model not counted)
    rank_tokens: int  # sum of ranks over B_fcfs requests
    # merged adapter -> (its batch, the transfers of a merged iteration), filled as decided
    merged: dict[Key, tuple[tuple[Request, ...], tuple[tuple[Key, Key, float], ...]]]


_adapter_of = attrgetter("adapter_id")


def _key_order(k: Key) -> tuple[bool, int]:
    return (k is None, k or 0)


@BATCH_POLICIES.register("credit", CreditParams)
class CreditPolicy(WaitTrigger, CreditRepeats, AimdThresholds, PolicyBase):
    """dLoRA's dynamic batching (module docstring)."""

    def __init__(self, params: CreditParams, ctx: PolicyContext) -> None:
        self.p = params
        self.ctx = ctx
        self.ranks = ctx.adapter_ranks
        self.credits: dict[Key, float] = {a: params.credit_start for a in ctx.adapter_ranks}
        self._parties: tuple[tuple[tuple[Key, Key, float], ...], dict[Key, tuple[float, ...]]] | None = None
        self.serving: frozenset[Key] = frozenset()
        self.benched: frozenset[Key] = frozenset()  # fell below the floor, not yet back at start
        self._above: set[Key] = set()  # adapters whose credit is above start (`_move_credits` keeps it)
        self._facts: tuple[Sequence[Request], int, _QueueFacts] | None = None  # `_queue_facts`' last
        # what `repeats` found for the iterations after the one planned: the queue, and per
        # iteration its decision, skip clocks and start (`observe_repeated` takes them as planned)
        self._ahead: tuple[QueueView, list[tuple[_Decision, dict[int, float], float]]] | None = None
        self._times: dict[tuple[int, int, int], float] = {}
        self._nets: tuple[tuple[tuple[Key, Key, float], ...], dict[Key, tuple[float, float]] | None] | None = None
        b = ctx.max_batch_size
        self.t_merged = self._time(b, 0, 0)
        ranks = sorted(self.ranks.values()) or [16]
        n_adapters = max(1, min(b, len(ranks)))
        self.t_unmerged = self._time(b, n_adapters, b * ranks[len(ranks) // 2])
        self.merge_right = params.merge_right_init
        self.merge_left = min(self.t_merged / self.t_unmerged, self.merge_right)
        self.trajectory: deque[tuple[int, float, float, str]] = deque(maxlen=TRAJECTORY_LIMIT)
        self.trajectory.append((0, self.merge_left, self.merge_right, "init"))
        self.threshold_changes = 0
        self.episode: _Episode | None = None
        self.counts = Counter[str]()
        self._memo: _Decision | None = None
        self._memo_queue: QueueView | None = None  # the queue `_memo` was decided for
        self._memo_step = -1  # the iteration `_memo` is for (a repeat's iterations share a decision)
        self._skipped_since: dict[int, float] = {}  # request id -> first skip of its current run
        self._skips_next: dict[int, float] = {}  # what the last plan would commit
        self._skips_now = 0.0
        self.max_skip_wait_s = 0.0
        self._resume: Key = None  # merged before the forced service just run (module docstring)

    # ---- profile timings ----
    def _time(self, n: int, adapters: int, rank_tokens: int) -> float:
        """Seconds of a decode iteration of `n` sequences at the reference context."""
        if n <= 0:
            return 0.0
        key = (n, adapters, rank_tokens)
        t = self._times.get(key)
        if t is None:
            ctx_tokens = min(self.p.reference_context_tokens, self.ctx.latency.range.max_context_tokens)
            t = self.ctx.latency.step_terms_s(n, n, n * ctx_tokens, 0, adapters, rank_tokens)
            self._times[key] = t
        return t

    def _switch_s(self, unmerge: Key, merge: Key) -> float:
        return self.ctx.latency.switch_s(
            self.ranks.get(unmerge) if unmerge is not None else None,
            self.ranks.get(merge) if merge is not None else None,
        )

    def credit(self, adapter: Key) -> float:
        return self.credits.get(adapter, self.p.credit_start)

    def starvation_bound_s(self, iteration_s: float) -> float:
        """Seconds a B_fcfs request can go unplanned given the longest iteration (module
        docstring); inf without the wait trigger (the credit bound is in iterations)."""
        limit = self.p.max_skip_s
        return math.inf if limit is None else limit + iteration_s

    def starvation_bound(self) -> int:
        """Iterations a request in B_fcfs can wait (module docstring)."""
        p = self.p
        low = min(p.credit_floor, p.credit_release)
        return math.ceil((p.credit_fire - low) / p.credit_per_skip) + self.ctx.max_batch_size

    # ---- decision ----
    def plan(self, queue: QueueView, now: float) -> Plan:
        """Service for starved adapters; else stay merged / merge the top adapter / FCFS
        unmerged by the two thresholds (module docstring)."""
        plan, decision = self._decide_with(queue, self._overdue(queue, now))
        self._memo = decision
        self._memo_queue = queue
        self._memo_step = queue.step
        self._skips_next, self._skips_now = self._skip_clocks(queue, plan, now), now
        self._ahead = None
        return plan

    def _queue_facts(self, queue: QueueView) -> _QueueFacts:
        """What `_decide` reads of the queue alone, kept while the same requests are planned
        again (a repeat's iterations, `repeats`)."""
        reqs, b = queue.requests, queue.max_batch_size
        cached = self._facts
        if cached is not None and cached[1] == b and (cached[0] is reqs or cached[0] == reqs):
            return cached[2]  # (the same requests in the same order: requests compare by identity)
        fcfs = tuple(reqs[:b])
        counts = queue.counts if queue.counts is not None else Counter(map(_adapter_of, reqs))
        in_fcfs = Counter(map(_adapter_of, fcfs))
        by_count = sorted(k for k in counts if k is not None)  # most requested first, ties: lowest id
        by_count.sort(key=counts.__getitem__, reverse=True)  # (a stable sort, also reversed)
        ranks = self.ranks
        facts = _QueueFacts(
            fcfs=fcfs, counts=counts, in_fcfs=in_fcfs, by_count=tuple(by_count),
            fcfs_adapters=len(in_fcfs) - (None in in_fcfs),
            rank_tokens=sum(ranks.get(k, 0) * n for k, n in in_fcfs.items() if k is not None), merged={})
        self._facts = (reqs, b, facts)
        return facts

    def _decide(self, queue: QueueView) -> tuple[Plan, _Decision]:
        reqs = queue.requests
        b = queue.max_batch_size
        facts = self._queue_facts(queue)
        fcfs = list(facts.fcfs)
        counts = facts.counts
        rank_tokens = facts.rank_tokens
        benched, floor = self.benched, self.p.credit_floor
        get, start = self.credits.get, self.p.credit_start  # (`credit`, inlined)

        def eligible(k: Key) -> bool:  # a merge candidate: queued, not benched, not below the floor
            return k is not None and k in counts and k not in benched and get(k, start) >= floor

        # the most requested eligible adapter (ties: lowest id)
        m = next((k for k in facts.by_count if k not in benched and get(k, start) >= floor), None)
        a = queue.merged_adapter
        if a is None:  # right after forced service: judge staying on the adapter merged before it
            a = self._resume
        stay = a is not None and eligible(a) and counts[a] >= self.merge_left * len(fcfs)
        cf_adapter = a if stay else m
        common = dict(step=queue.step, merged_cf=min(b, counts[cf_adapter]) if cf_adapter is not None else 0,
                      merged_cf_adapter=cf_adapter, fcfs_n=len(fcfs), fcfs_adapters=facts.fcfs_adapters,
                      fcfs_rank_tokens=rank_tokens)
        # (a credit at fire is above start: only creditors can have fired)
        fire = self.p.credit_fire
        fired = {k for k in self._above if k in counts and get(k, start) >= fire}
        if fired:  # settle every creditor in one service period: fewer round trips of switches
            fired |= {k for k in counts if self.credit(k) >= self.p.credit_release}
        serving = frozenset(k for k in self.serving | fired if counts[k] > 0) if fired or self.serving \
            else frozenset()
        if serving:
            # (the first so many of a scan: stopped there, a long queue is not read to its end)
            first = list(islice((r for r in reqs if r.adapter_id in serving), b))
            chosen = {r.id for r in first}
            rest = list(islice((r for r in reqs if r.id not in chosen), b - len(first)))
            batch = first + rest
            in_batch = {r.id for r in batch}
            displaced = [r.adapter_id for r in fcfs if r.id not in in_batch]
            payers = [r.adapter_id for r in first]
            others = [k for k in self.credits if k not in serving]
            pairs = list(zip(payers, displaced, strict=False))  # the displaced are paid first
            if others:  # the rest goes to the lowest credit (nobody left when all are served)
                lowest = min(others, key=lambda k: (self.credits[k], _key_order(k)))
                pairs += [(p, lowest) for p in payers[len(displaced):]]
            step = self.p.credit_per_skip
            transfers = tuple((p, q, step) for p, q in pairs if p != q)
            plan = Plan(BatchMode.UNMERGED, None, batch, forced_by_credit=True)
            return plan, _Decision(mode=BatchMode.UNMERGED, adapter=None, forced=True, transfers=transfers,
                                   serving=serving, resume=a, **common)  # type: ignore[arg-type]
        target = a if stay else (m if m is not None and counts[m] >= self.merge_right * len(fcfs) else None)
        if target is None:
            plan = Plan(BatchMode.UNMERGED, None, fcfs)
            return plan, _Decision(mode=BatchMode.UNMERGED, adapter=None, forced=False,
                                   transfers=self._settle(facts.in_fcfs),
                                   serving=serving, **common)  # type: ignore[arg-type]
        merged = facts.merged.get(target)
        if merged is None:  # (the same for every plan of this queue that merges `target`)
            s = self.p.credit_per_skip
            merged = facts.merged[target] = (
                tuple(islice((r for r in reqs if r.adapter_id == target), b)),
                tuple((target, r.adapter_id, s) for r in fcfs if r.adapter_id != target))
        batch, transfers = list(merged[0]), merged[1]
        plan = Plan(BatchMode.MERGED, target, batch)
        return plan, _Decision(mode=BatchMode.MERGED, adapter=target, forced=False, transfers=transfers,
                               serving=serving, **common)  # type: ignore[arg-type]

    def _settle(self, in_batch: Counter[Key]) -> tuple[tuple[Key, Key, float], ...]:
        """A plain FCFS iteration's transfer: highest credit above start -> lowest below start
        with requests in the batch (`in_batch`: requests per adapter), `credit_per_skip` per
        such request, not past start."""
        start = self.p.credit_start
        above = self._above
        if not above:
            return ()
        get = self.credits.get
        below = [k for k in in_batch if get(k, start) < start]  # (`credit`, inlined)
        if not below:
            return ()
        # the lowest credit below start (ties: lowest id), the highest above it (ties: lowest
        # id): the keys of the minimum are unique, so it is found whatever the sets' order
        lowest = min([get(k, start) for k in below])
        low = min([k for k in below if get(k, start) == lowest], key=_key_order)
        credits = self.credits
        highest = max([credits[k] for k in above])
        high = min([k for k in above if credits[k] == highest], key=_key_order)
        amount = min(self.p.credit_per_skip * in_batch[low], self.credits[high] - start,
                     start - self.credit(low))
        return ((high, low, amount),)

    def stats(self) -> dict[str, Any]:
        credits = list(self.credits.values())
        return {
            "merge_left": self.merge_left,
            "merge_right": self.merge_right,
            "t_merged_s": self.t_merged,
            "t_unmerged_s": self.t_unmerged,
            "threshold_changes": self.threshold_changes,
            "threshold_trajectory": [list(t) for t in self.trajectory],
            "credit_min": min(credits) if credits else 0.0,
            "credit_max": max(credits) if credits else 0.0,
            "starvation_bound_iterations": self.starvation_bound(),
            "max_skip_wait_s": self.max_skip_wait_s,
            **dict(sorted(self.counts.items())),
        }

