"""The simulator's driver: one SimPy process per replica on virtual time, an arrival process,
and a periodic migration check (DESIGN.md section 3).

An idle replica sleeps on a re-armed event (no polling). The run ends when every request has
finished or been rejected, or at the scenario's horizon with unfinished requests reported.
With `run.fast_path`, runs of identical decode iterations skip the policy and admission work;
results are identical to stepping every iteration (tested)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from ..build import load_latency, make_adapters, make_cluster
from ..core.replica import ReplicaScheduler
from ..errors import ProfileError
from ..latency import LatencyModel
from ..report import RunResult, note_queue_length
from ..scenario import Scenario
from ..types import Executor, Request
from ..workload import build_requests
from .executor import ProfiledExecutor
from .fastpath import FastPath, Jump, at

log = logging.getLogger(__name__)


@dataclass
class SimResult(RunResult):
    # with measure_scheduler: wall seconds of schedule() + complete() per scheduled iteration,
    # times every iteration (jumped ones included: a live system schedules each of them)
    scheduler_wall_s: float = 0.0
    fast_path: dict[str, int] | None = None  # the fast path's counters (`FastPath.stats`), if on


class _Sim:
    def __init__(self, scenario: Scenario, latency: LatencyModel, requests: list[Request],
                 executor_factory: Callable[[int], Executor] | None, record_batches: bool,
                 progress: Callable[[int, int], None] | None, prefix_caching: bool | None = None) -> None:
        self.scenario = scenario
        self.stop_check: tuple[Callable[[float, list[Request]], bool], float] | None = None
        self.measure = False
        self.sched_wall_s = 0.0
        self.sched_calls = 0
        self.env = simpy.Environment()
        self.adapters = make_adapters(scenario, latency)
        caching = scenario.cluster.prefix_caching if prefix_caching is None else prefix_caching
        self.cluster, self.migrator = make_cluster(scenario, latency, self.adapters, prefix_caching=caching)
        self.requests = requests
        self.total = len(requests)
        self.done = 0
        self.progress = progress
        factory = executor_factory or (lambda i: ProfiledExecutor(latency, self.adapters))
        self.executors = [factory(r.id) for r in self.cluster.replicas]
        self.wake: list[simpy.Event | None] = [None] * len(self.cluster.replicas)
        self.all_done = self.env.event()
        self.queue_samples: list[list[tuple[float, int]]] = [[] for _ in self.cluster.replicas]
        self.batch_log: list[Any] | None = [] if record_batches else None
        self.next_arrival_i = 0
        use_fast = scenario.run.fast_path and executor_factory is None
        self.fast = FastPath(latency, self.adapters) if use_fast else None
        self.jumps: dict[int, Jump] = self.fast.active if self.fast is not None else {}
        if self.fast is not None:
            self.cluster.before_read = self.observe
            self.cluster.unapplied = self.fast.unapplied

    # ---- processes ----
    def arrivals(self):
        env, cluster = self.env, self.cluster
        for i, r in enumerate(self.requests):
            delay = r.arrival_s - env.now
            if delay > 0:
                yield env.timeout(delay)
            self.next_arrival_i = i + 1
            # no observe_all: the dispatcher brings up to date only the replicas it reads
            # (`Cluster.before_read`)
            replica = cluster.submit(r, env.now)
            if replica is None:
                self._count_done(1)
            else:
                self._sample(replica)
                self._wake(replica.id)

    def replica(self, rep: ReplicaScheduler, executor: Executor):
        env = self.env
        cluster = self.cluster
        while True:
            cluster.end_step(rep.id)
            if cluster.deferred:  # migrations that waited for this replica's last iteration
                for dst in cluster.run_deferred(rep.id, env.now):
                    self._wake(dst.id)
            t0 = time.perf_counter() if self.measure else 0.0
            batch = rep.schedule(env.now)
            if self.measure:
                self.sched_wall_s += time.perf_counter() - t0
                self.sched_calls += batch is not None
            if batch is None:
                self.wake[rep.id] = env.event()
                yield self.wake[rep.id]
                continue
            cluster.begin_step(rep.id, batch)
            if self.batch_log is not None:
                self.batch_log.append((rep.id, batch.step, str(batch.mode), batch.merged_adapter, batch.request_ids))
            result = executor.execute(batch)
            yield env.timeout(result.elapsed_s)
            t0 = time.perf_counter() if self.measure else 0.0
            finished = rep.complete(batch, result, env.now)
            if self.measure:
                self.sched_wall_s += time.perf_counter() - t0
            if finished:
                self.cluster.on_finished(finished)
                self._count_done(len(finished))
                self._sample(rep)
            if self.fast is not None and rep.has_work and not cluster.deferred.get(rep.id):
                # (a migration that waited for this iteration runs first, at the loop's top)
                yield from self._jump(rep)

    def migration(self):
        interval = self.migrator.interval_s
        assert interval is not None
        env = self.env
        while True:
            yield env.timeout(interval)
            self.observe_all(env.now)
            actions = self.migrator.plan(self.cluster.view(env.now), env.now)
            for rep in self.cluster.apply(actions, env.now):
                self._wake(rep.id)

    def placement(self, interval: float):
        """Periodic re-placement of adapters (placement-aware dispatchers)."""
        env = self.env
        while True:
            yield env.timeout(interval)
            self.observe_all(env.now)
            for rep in self.cluster.place(env.now):
                self._wake(rep.id)

    def _jump(self, rep: ReplicaScheduler):
        """Cover the identical decode iterations that follow with one event (see fastpath.py)."""
        assert self.fast is not None
        env = self.env
        while True:
            if self.fast.admits_next(rep):
                return  # (a waiting request will be admitted now: a prefill, stepped)
            jump = self.fast.plan(rep, float(env.now), self.scenario.run.horizon_s)
            if jump is None:
                return
            self.jumps[rep.id] = jump
            self.cluster.begin_step(rep.id, jump.batch)
            self.fast.jumps += 1
            wake = env.event()
            self.wake[rep.id] = wake
            yield at(env, jump.ends[-1]) | wake
            self.wake[rep.id] = None
            self.fast.materialize(jump, float(env.now))
            if not jump.done and not (jump.finishing and jump.applied == len(jump.times) - 1
                                      and jump.ends[-1] <= env.now):
                # woken: something changed this replica; finish the iteration in flight
                end = self.fast.cut(jump)
                if end > env.now:
                    yield at(env, end)
                self.fast.materialize(jump, float(env.now))
            finished = self.fast.finish(jump, float(env.now))
            assert jump.done
            del self.jumps[rep.id]
            self.cluster.end_step(rep.id)
            if finished:  # as after a stepped iteration that finished requests (the replica loop)
                self.cluster.on_finished(finished)
                self._count_done(len(finished))
                self._sample(rep)
            if not rep.has_work or self.cluster.deferred.get(rep.id):
                return  # (a migration that waited for this iteration runs at the loop's top)

    def watch(self, check: Callable[[float, list[Request]], bool], interval_s: float):
        """Stop the run early when `check(now, requests)` says its outcome is already decided."""
        while True:
            yield self.env.timeout(interval_s)
            self.observe_all(float(self.env.now))
            if check(float(self.env.now), self.requests):
                self.stopped.succeed()
                return

    # ---- helpers ----
    def observe(self, replica: int, now: float) -> None:
        """Bring one replica in a jump up to `now` (`Cluster.before_read`)."""
        jump = self.jumps.get(replica)
        if jump is not None:
            assert self.fast is not None
            self.fast.materialize(jump, now)

    def observe_all(self, now: float) -> None:
        """Bring replicas in a jump up to `now` before anything looks at them."""
        if self.fast is not None:
            for jump in self.jumps.values():
                self.fast.materialize(jump, now)
                self.fast.add_times(jump)

    def _wake(self, rid: int) -> None:
        ev = self.wake[rid]
        if ev is not None and not ev.triggered:
            self.wake[rid] = None
            ev.succeed()

    def _sample(self, rep: ReplicaScheduler) -> None:
        note_queue_length(self.queue_samples[rep.id], self.env.now, rep.num_unfinished)

    def _count_done(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)
        if self.done >= self.total and not self.all_done.triggered:
            self.all_done.succeed()

    def run(self) -> float:
        env = self.env
        if self.total == 0:
            return 0.0
        self.cluster.place(0.0, initial=True)
        placer = self.cluster.placer
        if placer is not None and placer.interval_s:
            env.process(self.placement(placer.interval_s))
        env.process(self.arrivals())
        for rep, ex in zip(self.cluster.replicas, self.executors, strict=True):
            env.process(self.replica(rep, ex))
        if self.migrator.interval_s:
            env.process(self.migration())
        horizon = self.scenario.run.horizon_s
        until: Any = self.all_done
        if horizon is not None:
            until = self.all_done | env.timeout(horizon)
        if self.stop_check is not None:
            self.stopped = env.event()
            env.process(self.watch(*self.stop_check))
            until = until | self.stopped
        try:
            env.run(until=until)
        except ProfileError as exc:  # a batch beyond the profile's measured range: say when
            raise ProfileError(f"at {env.now:.9g} simulated seconds: {exc}") from exc
        self.observe_all(float(env.now))
        return float(env.now)


def simulate(
    scenario: Scenario,
    requests: list[Request] | None = None,
    executor_factory: Callable[[int], Executor] | None = None,
    record_batches: bool = False,
    progress: Callable[[int, int], None] | None = None,
    measure_scheduler: bool = False,
    stop_check: tuple[Callable[[float, list[Request]], bool], float] | None = None,
    prefix_caching: bool | None = None,
) -> SimResult:
    """Simulate a scenario. `requests` replaces the scenario's workload (the same list feeds
    live runs); `executor_factory(replica_id)` replaces the profiled executor (tests).
    `prefix_caching` overrides `cluster.prefix_caching` (None: the scenario's)."""
    latency = load_latency(scenario)
    if requests is None:
        rng = np.random.default_rng(scenario.seed)
        from pathlib import Path

        names = scenario.adapters.adapter_names()
        requests = build_requests(scenario.workload, names, rng, Path(scenario.base_dir))
    wall0 = time.perf_counter()
    sim = _Sim(scenario, latency, requests, executor_factory, record_batches, progress, prefix_caching)
    # before any work (else a step beyond the profile's range stops the run there), the requests
    # that arrive before the horizon; those no replica could hold are rejected as ever
    horizon = scenario.run.horizon_s
    latency.check_contexts(requests if horizon is None else [r for r in requests if r.arrival_s < horizon],
                           sim.cluster.could_run)
    sim.measure = measure_scheduler
    sim.stop_check = stop_check  # (check(now, requests) -> stop?, every so many simulated seconds)
    end_s = sim.run()
    wall = time.perf_counter() - wall0
    iterations = sum(rep.stats.iterations for rep in sim.cluster.replicas)
    sched = sim.sched_wall_s / sim.sched_calls * iterations if sim.sched_calls else 0.0
    return SimResult(scenario, requests, sim.cluster, sim.migrator, sim.adapters, end_s, wall,
                     sim.queue_samples, sim.batch_log, sched, sim.fast.stats() if sim.fast is not None else None)
