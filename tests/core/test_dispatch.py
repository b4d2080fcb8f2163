"""Dispatchers on hand-made views (cheapest candidate, merged discount, baselines) and the
placement component (coverage, slots, memory, replication, actions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlora.core.context import DispatchContext, ReplicaConfig
from dlora.core.dispatch import DISPATCHERS
from dlora.core.dispatch_dlora import DispatchCost
from dlora.core.memory import MemoryConfig
from dlora.core.placement_policy import PlacementParams, Placer
from dlora.latency import LatencyModel
from dlora.profile import load_profile
from dlora.types import Adapter, Request
from dlora.views import ClusterView, DropAdapter, LoadAdapter, ReplicaView

ROOT = Path(__file__).resolve().parents[2]
LATENCY = LatencyModel(load_profile(ROOT / "profiles" / "a800-llama-2-7b.yaml"))
SIZE = 100 * 2**20


def ctx(num_adapters=4, replicas=3, slots=None, budget=None):
    adapters = {k: Adapter(k, f"a{k}", 16, SIZE) for k in range(num_adapters)}
    memory = MemoryConfig(64 * 2**30, 16, 16 * LATENCY.kv_bytes_per_token, max_adapter_slots=slots,
                          adapter_budget_bytes=budget)
    return DispatchContext(LATENCY, adapters, replicas, 0, ReplicaConfig(16), memory)


def rv(rid, work=0.0, resident=(), per_adapter=(), slots_free=4, kv_used=0, kv_total=1000,
       merged=None):  # fmt: skip
    n = sum(c for _, c in per_adapter)
    return ReplicaView(rid, True, n, 0, 0, kv_used, kv_total, frozenset(resident), merged, work,
                       tuple(per_adapter), slots_free, backlog_s=work)  # fmt: skip


def req(adapter, rid=0):
    return Request(rid, adapter, 0.0, 100, 100)


def make(name, c=None, **params):
    return DISPATCHERS.create(name, params, "policies.dispatch", c or ctx())


def test_dlora_picks_the_cheapest_holder():
    d = make("dlora", placement="none")
    busy = ((1, 20),)  # 20 requests, batch cap 16: a new one waits for 5 to finish
    view = ClusterView(0.0, (rv(0, 5.0, {1}, busy), rv(1, 2.0, {1}, busy),
                             rv(2, 0.0, {2}, ((2, 3),), slots_free=0)))  # fmt: skip
    # replica 2 is idle-ish but cannot load adapter 1 (no slot, its adapter is busy)
    assert d.choose(req(1), view, 0.0) == 1
    # with batch room everywhere nobody waits: the smaller backlog wins among holders
    view = ClusterView(0.0, (rv(0, 5.0, {1}, ((1, 3),)), rv(1, 2.0, {1}, ((1, 9),))))
    assert d.choose(req(1), view, 0.0) == 1


def test_dlora_loads_on_a_cheaper_replica_only_when_load_time_pays():
    d = make("proactive", placement="none")
    cost = DispatchCost(ctx())
    load = LATENCY.load_s(SIZE)
    holder = rv(0, 1.0, {1}, ((1, 8), (3, 8)))  # full: a new request waits for one to finish
    wait = cost.queued_s(holder)
    assert wait == pytest.approx(1.0 / 16)
    assert wait > load
    assert d.choose(req(1), ClusterView(0.0, (holder, rv(1, 5.0, {2}, ((2, 3),)))), 0.0) == 1
    holder = rv(0, load / 2 * 16, {1}, ((1, 8), (3, 8)))  # now the wait is shorter than the load
    assert d.choose(req(1), ClusterView(0.0, (holder, rv(1, 0.0, {2}))), 0.0) == 0
    no_load = make("dlora", placement="none", load_candidates=False)
    holder = rv(0, 100.0, {1}, ((1, 40),))
    assert no_load.choose(req(1), ClusterView(0.0, (holder, rv(1, 0.0, {2}))), 0.0) == 0


def test_merged_discount_prefers_full_single_adapter_batches():
    cost = DispatchCost(ctx())
    assert 0.5 < cost.merged_ratio < 1.0
    one_adapter = rv(0, 3.0, {0}, per_adapter=((0, 16),))
    mixed = rv(1, 3.0, {0}, per_adapter=tuple((k, 4) for k in range(4)))
    assert cost.queued_s(one_adapter) == pytest.approx(3.0 / 16 * cost.merged_ratio)
    assert cost.queued_s(mixed) == pytest.approx(3.0 / 16)
    assert cost.queued_s(rv(2, 3.0, {0}, per_adapter=((0, 15),))) == 0.0  # room: no wait
    d = make("dlora", placement="none")
    assert d.choose(req(0), ClusterView(0.0, (mixed, one_adapter)), 0.0) == one_adapter.id


def test_dlora_follows_placement_holders():
    c = ctx(num_adapters=4, replicas=2)
    d = make("dlora", c, placement="round_robin", load_candidates=False)
    view = ClusterView(0.0, (rv(0, 9.0), rv(1, 0.0)))
    d.placer.initial(view)
    assert d.choose(req(2), view, 0.0) == 0  # adapter 2 lives on replica 0 only
    assert d.choose(req(3), view, 0.0) == 1


def test_consolidate_packs_the_busiest_replica_with_room():
    d = make("consolidate")
    view = ClusterView(0.0, (rv(0, 1.0, per_adapter=((0, 3),)), rv(1, 2.0, per_adapter=((0, 9),)),
                             rv(2, 9.0, per_adapter=((0, 16),))))  # fmt: skip
    assert d.choose(req(0), view, 0.0) == 1  # replica 2 is full (16 = max_batch_size)
    full = ClusterView(0.0, tuple(rv(i, w, per_adapter=((0, 16),)) for i, w in enumerate((3.0, 1.0))))
    assert d.choose(req(0), full, 0.0) == 1  # no room anywhere: least loaded


def test_affinity_routes_to_a_holder_else_least_loaded():
    d = make("affinity")
    view = ClusterView(0.0, (rv(0, 0.0, {1}), rv(1, 5.0, {2}), rv(2, 3.0, {2})))
    assert d.choose(req(2), view, 0.0) == 2
    assert d.choose(req(3), view, 0.0) == 0


def test_round_robin_placement_sends_requests_to_their_holder():
    d = make("round_robin", ctx(num_adapters=6, replicas=3), placement="round_robin")
    view = ClusterView(0.0, tuple(rv(i) for i in range(3)))
    actions = d.placer.initial(view)
    assert all(isinstance(a, LoadAdapter) for a in actions)
    assert sorted((a.replica, a.adapter_id) for a in actions) == sorted((k % 3, k) for k in range(6))
    assert [d.choose(req(k), view, 0.0) for k in range(6)] == [0, 1, 2, 0, 1, 2]
    plain = make("round_robin")
    assert [plain.choose(req(5), view, 0.0) for _ in range(4)] == [0, 1, 2, 0]


@pytest.mark.parametrize("slots,budget", [(3, None), (None, 5 * SIZE), (2, 3 * SIZE)])
def test_placer_covers_every_adapter_within_slots_and_memory(slots, budget):
    num_adapters, replicas = 6, 4
    placer = Placer(PlacementParams(placement="proactive"), ctx(num_adapters, replicas).adapters,
                    replicas, slots, budget or 10**12)
    view = ClusterView(0.0, tuple(rv(i) for i in range(replicas)))
    first = placer.initial(view)
    before = placer.placement.pairs
    assert all(isinstance(a, LoadAdapter) for a in first)
    for k in range(num_adapters):
        assert placer.holders(k), f"adapter {k} not placed"
    for i in range(replicas):
        on = placer.placement.adapters_on(i)
        assert len(on) <= (slots or num_adapters)
        assert len(on) * SIZE <= (budget or 10**12)
    # a hot adapter gets replicated once history shows it
    for t in range(400):
        placer.record(0, t * 0.1)
    for t in range(40):
        placer.record(1 + t % (num_adapters - 1), t)
    changes = placer.replan(view, 40.0)
    assert len(placer.holders(0)) > 1
    loads = {(a.replica, a.adapter_id) for a in changes if isinstance(a, LoadAdapter)}
    drops = {(a.replica, a.adapter_id) for a in changes if isinstance(a, DropAdapter)}
    assert placer.placement.pairs == (before - drops) | loads
    assert not loads & drops and not loads & before and drops <= before
    for k in range(num_adapters):
        assert placer.holders(k)


def test_placer_falls_back_to_round_robin_when_slots_cannot_cover():
    placer = Placer(PlacementParams(placement="proactive"), ctx(6, 2).adapters, 2, 2, 10**12)
    view = ClusterView(0.0, (rv(0), rv(1)))
    actions = placer.initial(view)  # 6 adapters, 4 slots: the greedy cannot cover them
    assert sorted((a.replica, a.adapter_id) for a in actions) == sorted((k % 2, k) for k in range(6))
    assert placer.replan(view, 1.0) == []  # still impossible: the layout is kept


def test_dlora_never_substitutes_proactive_does():
    """The paper's load balancers differ in their candidates: `dlora` keeps a request on its
    adapter's holders (imbalance is the co-migration's); `proactive` loads it at a cheaper
    non-holder (adapter substitution); RR (round-robin placement) sends it to its one holder."""
    busy = rv(0, 8.0, {1}, ((1, 24),))  # the only holder, full: a new request waits
    idle = rv(1, 0.0, {2}, ((2, 1),))  # free slots, adapter 1 not there
    view = ClusterView(0.0, (busy, idle))
    dl, pro = make("dlora", placement="none"), make("proactive", placement="none")
    assert dl.choose(req(1), view, 0.0) == 0 and dl.stats()["substitutions"] == 0
    assert pro.choose(req(1), view, 0.0) == 1 and pro.stats()["substitutions"] == 1
    rr = make("dlora", ctx(num_adapters=4, replicas=2), placement="round_robin")
    rr.placer.initial(view)
    assert rr.choose(req(1), view, 0.0) == 1  # adapter 1 is placed on replica 1 (1 % 2)
    assert rr.choose(req(0), view, 0.0) == 0 and rr.stats()["substitutions"] == 0  # busy holder kept
    assert rr.placer.replan(view, 0.0) == []  # static: never re-placed


def test_placement_replans_after_a_window_of_arrivals():
    c = ctx(num_adapters=4, replicas=2, slots=3)
    d = make("dlora", c, replan_window_requests=10)
    view = ClusterView(0.0, (rv(0), rv(1)))
    d.placer.initial(view)
    for i in range(9):
        d.choose(req(0, i), view, float(i))
    assert d.placer.replan(view, 9.0) == [] and d.placer.num_replans == 0  # 9 < 10 arrivals
    d.choose(req(0, 9), view, 9.5)
    d.placer.replan(view, 10.0)
    assert d.placer.num_replans == 1 and d.placer.arrivals_since_plan == 0


def test_replan_keeps_the_placement_unless_the_new_one_is_better_by_the_margin():
    """Hysteresis (`replan_min_gain`): a re-placement under the same popularity moves nothing;
    a popularity change that makes the current placement's worst-served adapter much worse off
    re-places; a dead replica's adapters move whatever the gain."""
    num_adapters, replicas = 8, 4
    view = ClusterView(0.0, tuple(rv(i) for i in range(replicas)))

    def placer(gain):  # type: ignore[no-untyped-def]
        p = Placer(PlacementParams(placement="proactive", replan_window_requests=0, replan_min_gain=gain),
                   ctx(num_adapters, replicas).adapters, replicas, 3, 10**12)
        p.initial(view)
        return p

    def arrivals(p, hot, t0):  # type: ignore[no-untyped-def]
        for i in range(400):
            p.record(hot if i % 2 else i % num_adapters, t0 + i * 0.05)

    p = placer(0.05)
    arrivals(p, 0, 0.0)
    first = p.replan(view, 20.0)  # adapter 0 turned hot: uniform placement is far off
    assert first and len(p.holders(0)) > 1 and p.num_kept == 0
    settled = p.placement
    arrivals(p, 0, 20.0)
    assert p.replan(view, 40.0) == [] and p.placement == settled and p.num_kept == 1
    arrivals(p, 5, 1000.0)  # later adapter 5 is the hot one (the old history has decayed)
    assert p.replan(view, 1020.0) and len(p.holders(5)) > 1
    assert p.stats()["replans_kept"] == 1
    dead = ClusterView(0.0, (*(rv(i) for i in range(replicas - 1)),
                             ReplicaView(replicas - 1, False, 0, 0, 0, 0, 1000, frozenset(), None, 0.0, (), 4,
                                         backlog_s=0.0)))
    arrivals(p, 5, 1020.0)
    p.replan(dead, 1040.0)
    assert all(r != replicas - 1 for r, _ in p.placement.pairs)


def test_a_deferred_view_computes_its_kv_fields_once_on_first_read_and_stays_immutable() -> None:
    calls = []

    def kv() -> tuple[int, int]:
        calls.append(1)
        return 30, 120

    lazy = ReplicaView.deferred((3, True, 2, 5, 0, frozenset({1}), None, 1.5, ((1, 7),), 2, 0.75), kv)
    eager = ReplicaView(3, True, 2, 5, 0, 30, 120, frozenset({1}), None, 1.5, ((1, 7),), 2, 0.75)
    assert lazy.num_requests == 7 and lazy.backlog_s == 0.75 and not calls  # no KV read yet
    assert lazy.kv_usage == 0.25 and lazy.kv_blocks_used == 30 and lazy.kv_blocks_total == 120
    assert len(calls) == 1
    assert lazy == eager and hash(lazy) == hash(eager) and repr(lazy) == repr(eager)
    assert lazy != ReplicaView(3, True, 2, 5, 0, 31, 120, frozenset({1}), None, 1.5, ((1, 7),), 2, 0.75)
    with pytest.raises(AttributeError, match="immutable"):
        lazy.backlog_s = 0.0  # type: ignore[misc]
