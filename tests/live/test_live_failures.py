"""Failures in the live driver: a failing step is reported and its requests are requeued and
complete; a replica that keeps failing is marked dead and its requests finish on live ones;
with every replica dead the run ends with each request rejected, none lost."""

from __future__ import annotations

import pytest
from live_helpers import scenario

from dlora.live import MonotonicClock, VirtualClock, build_live_report, run
from dlora.testing import ScriptedExecutor
from dlora.types import Batch, Request, RequestStatus, StepResult

SETS = ("workload.num_requests=30", "workload.lengths.scale=0.2", "cluster.replicas=2",
        "policies.dispatch=round_robin", "workload.arrival.rate_per_s=100")


class Flaky(ScriptedExecutor):
    """Raises on the steps in `raise_on`, returns an error on those in `error_on`, and from
    step `dead_from` on raises on every step."""

    def __init__(self, raise_on=(), error_on=(), dead_from: int | None = None) -> None:
        super().__init__(0.02)
        self.raise_on, self.error_on, self.dead_from = set(raise_on), set(error_on), dead_from
        self.calls = 0

    def execute(self, batch: Batch) -> StepResult:
        self.calls += 1
        if self.calls in self.raise_on or (self.dead_from is not None and self.calls >= self.dead_from):
            raise RuntimeError(f"device lost at call {self.calls}")
        if self.calls in self.error_on:
            return StepResult(0.01, error="kernel failed")
        return super().execute(batch)


def all_complete(requests: list[Request]) -> bool:
    return all(r.status == RequestStatus.FINISHED and r.generated_tokens == r.output_tokens
               for r in requests)


@pytest.mark.parametrize("clock", [VirtualClock, MonotonicClock])
def test_failing_steps_are_reported_and_their_requests_requeued_and_completed(clock):
    sc = scenario(*SETS)
    flaky = {0: Flaky(raise_on={3}, error_on={6}), 1: Flaky(error_on={2})}
    res = run(sc, executor_factory=flaky.__getitem__, clock=clock())
    assert all_complete(res.requests)
    live = res.live
    assert live["failed_steps"] == 3 and live["executor_exceptions"] == 1
    assert live["requeued_requests"] >= 3 and live["dead_replicas"] == []
    assert any("device lost at call 3" in e for e in live["errors"])
    report = build_live_report(res)
    assert report.summary["totals"]["failed_steps"] == 3
    assert [row["failed_steps"] for row in report.replicas] == [2, 1]


@pytest.mark.parametrize("clock", [VirtualClock, MonotonicClock])
def test_a_dead_replicas_requests_move_to_live_ones_and_complete(clock):
    sc = scenario(*SETS)
    execs = {0: ScriptedExecutor(0.02), 1: Flaky(dead_from=4)}
    res = run(sc, executor_factory=execs.__getitem__, clock=clock(), max_step_failures=3)
    assert all_complete(res.requests)
    live = res.live
    assert live["dead_replicas"] == [1] and live["replicas_alive"] == 1
    assert live["moved_from_dead"] > 0 and live["failed_steps"] == 3
    assert not res.cluster.replicas[1].is_alive and not res.cluster.replicas[1].unfinished
    assert all(r.replica == 0 for r in res.requests)  # moved ones and later arrivals alike
    assert execs[1].calls == 6  # three good steps, three failures, then nothing more


def test_with_every_replica_dead_each_request_is_rejected_not_lost():
    sc = scenario(*SETS)
    res = run(sc, executor_factory=lambda i: Flaky(dead_from=1), clock=VirtualClock())
    assert all(r.status == RequestStatus.ABORTED for r in res.requests)
    assert all(r.finish_reason.startswith("rejected:") for r in res.requests)
    summary = build_live_report(res).summary
    assert summary["completed"] == 0 and summary["rejected"] == 30 and summary["unfinished"] == 0
    assert sorted(res.live["dead_replicas"]) == [0, 1]


def test_a_crashing_worker_evacuates_its_replica():
    """A step result the core cannot apply (too few token ids) crashes replica 1's worker:
    its requests move to replica 0 and complete; the run does not hang."""

    def short_tokens(batch: Batch) -> StepResult:
        return StepResult(0.02, token_ids=())

    sc = scenario(*SETS)
    execs = {0: ScriptedExecutor(0.02), 1: ScriptedExecutor(script=short_tokens)}
    res = run(sc, executor_factory=execs.__getitem__, clock=VirtualClock())
    assert res.live["dead_replicas"] == [1]
    assert all(r.status == RequestStatus.FINISHED and r.replica == 0 for r in res.requests)


class PoisonedBy(ScriptedExecutor):
    """Raises on every step whose batch holds request `poison` (a fault nothing pins on it)."""

    def __init__(self, poison: int) -> None:
        super().__init__(0.02)
        self.poison = poison

    def execute(self, batch: Batch) -> StepResult:
        if self.poison in batch.request_ids:
            raise RuntimeError("device-side assert triggered")
        return super().execute(batch)


def test_a_request_that_kills_two_replicas_fails_alone_instead_of_moving_on():
    sc = scenario(*SETS, "cluster.replicas=3")
    res = run(sc, executor_factory=lambda i: PoisonedBy(0), clock=VirtualClock())
    poison = next(r for r in res.requests if r.id == 0)
    assert poison.status == RequestStatus.ABORTED and poison.finish_reason == "error"
    assert "2 replicas that died" in poison.error
    assert len(res.live["dead_replicas"]) == 2 and res.live["replicas_alive"] == 1
    assert all_complete([r for r in res.requests if r.id != 0])  # the last replica served the rest
