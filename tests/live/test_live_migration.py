"""Live migration on the real executor: a request moved mid-decode, with its KV blocks copied
(or recomputed) and its adapter loaded at the destination, continues where it stopped; a KV
copy that fails falls back to recompute on the destination, nothing lost."""

from __future__ import annotations

from typing import Any

import pytest
from live_helpers import LIVE_DEMO

from dlora.build import load_latency, make_adapters, make_cluster
from dlora.live import LiveCluster, VirtualClock
from dlora.live.executors import prompt_token_ids, torch_executors
from dlora.scenario import load_scenario
from dlora.types import MigrateMode, Request, RequestStatus, SamplingParams
from dlora.views import Action, ClusterView, MigrateRequest

pytest.importorskip("torch")


class MoveOnce:
    """Moves request 0 to the other replica once it has `after` output tokens."""

    interval_s = 0.001

    def __init__(self, mode: MigrateMode | None, after: int = 3) -> None:
        self.mode, self.after, self.cluster, self.moved = mode, after, None, False

    def plan(self, view: ClusterView, now: float) -> list[Action]:
        r = self.cluster.requests.get(0)
        if self.mode is None or self.moved or r is None or r.generated_tokens < self.after:
            return []
        self.moved = True
        return [MigrateRequest(0, r.replica, 1 - r.replica, self.mode)]

    def stats(self) -> dict[str, Any]:
        return {}


def run_one(mode: MigrateMode | None, break_export: bool = False) -> tuple[Request, LiveCluster]:
    sc = load_scenario(LIVE_DEMO, ["policies.batching=unmerged_only", "policies.dispatch=round_robin"])
    latency = load_latency(sc)
    adapters = make_adapters(sc, latency)
    cluster, _ = make_cluster(sc, latency, adapters)
    executors, _ = torch_executors(sc, cluster, adapters, device="cpu")
    if break_export:
        def broken(request_id: int) -> Any:
            raise RuntimeError("link down")
        executors[0].export_kv = broken  # type: ignore[attr-defined]
    mover = MoveOnce(mode)
    mover.cluster = cluster
    req = Request(0, 1, 0.0, prompt_tokens=20, output_tokens=12,
                  prompt_token_ids=prompt_token_ids(0, 0, 20), sampling=SamplingParams())
    live = LiveCluster(cluster, mover, executors, clock=VirtualClock(), require_token_ids=True)
    live.start(replay=[req])
    assert live.wait(60)
    live.stop()
    return req, live


@pytest.mark.parametrize("mode", [MigrateMode.TRANSFER, MigrateMode.RECOMPUTE])
def test_a_migrated_request_continues_where_it_stopped(mode, demo_home):
    reference, _ = run_one(None)
    moved, live = run_one(mode)
    assert reference.replica == 0 and reference.num_migrations == 0
    assert moved.replica == 1 and moved.num_migrations == 1
    assert moved.generated_tokens == 12 and moved.status == RequestStatus.FINISHED
    if mode == MigrateMode.TRANSFER:  # the copied KV is bit-identical: so is the continuation
        assert moved.output_token_ids == reference.output_token_ids
        assert live.stats.kv_transfers == 1
    else:
        assert live.stats.kv_transfers == 0
    assert live.stats.failed_steps == 0
    dst = live.cluster.replicas[1]
    assert dst.stats.adapter_loads >= 1  # the adapter came along
    assert all(rep.memory.kv_used_blocks == 0 for rep in live.cluster.replicas)


def test_a_failed_kv_copy_falls_back_to_recompute(demo_home):
    moved, live = run_one(MigrateMode.TRANSFER, break_export=True)
    assert moved.replica == 1 and moved.generated_tokens == 12
    assert live.stats.kv_transfer_failures == 1 and live.stats.failed_steps == 1
    assert live.stats.dead_replicas == []
