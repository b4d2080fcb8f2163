"""The live driver: `run(scenario)` replays a scenario's workload on wall time through the same
scheduler objects as `simulate` (dlora.build.make_cluster), with one executor per replica
(TorchExecutor by default), and returns a result the simulator's report builder accepts.

`create_live_cluster` builds the same cluster for a long-running server (issue 7): start it,
`submit` requests, stream tokens through `on_token` / `on_finish`, `abort`, `stop`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..build import load_latency, make_adapters, make_cluster
from ..errors import ConfigError
from ..labels import count, seconds
from ..metrics import Report
from ..output import Outcome, write_outputs
from ..report import RunResult, build_report
from ..scenario import Scenario
from ..types import Adapter, Executor, Request
from ..workload import build_requests
from . import machine_load
from .callbacks import FinishCallback, TokenCallback
from .clock import Clock, MonotonicClock
from .engine import LiveCluster
from .executors import ModelLimits, prepare_requests, torch_executors

log = logging.getLogger(__name__)


@dataclass
class LiveResult(RunResult):
    """What a live run produced: a run's result plus the live driver's own statistics."""

    live: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LiveSystem:
    live: LiveCluster
    adapters: dict[int, Adapter]  # scenario adapter id -> Adapter (name, rank, path)
    limits: ModelLimits  # vocabulary and context length of the model


def create_live_cluster(
    scenario: Scenario, executor_factory: Callable[[int], Executor] | None = None, *,
    clock: Clock | None = None, device: str | None = None, on_token: TokenCallback | None = None,
    on_finish: FinishCallback | None = None, max_step_failures: int = 3,
    record_batches: bool = False, retain_requests: bool = True,
    progress: Callable[[int, int], None] | None = None, status: Callable[[str], None] | None = None,
) -> LiveSystem:
    """The scenario's cluster (same objects as `simulate`, prefix caching as
    `cluster.prefix_caching` says) with one executor per replica: `executor_factory(replica_id)`
    if given, else TorchExecutors of the scenario's model (they share KV blocks as the core's
    memory pool does)."""
    if scenario.sweep is not None:
        raise ConfigError("sweep: a live run takes one scenario; remove the sweep section "
                          "(or use `dlora simulate` for sweeps)")
    latency = load_latency(scenario)
    adapters = make_adapters(scenario, latency)
    cluster, migrator = make_cluster(scenario, latency, adapters,
                                     prefix_caching=scenario.cluster.prefix_caching)
    if executor_factory is None:
        if status is not None:
            status(f"loading {model_words(scenario)} into {len(cluster.replicas)} replica(s) with "
                   f"{len(adapters)} adapter(s)")
        executors, limits = torch_executors(scenario, cluster, adapters, device)
        require_ids = True
    else:
        executors, limits, require_ids = [executor_factory(r.id) for r in cluster.replicas], ModelLimits(), False
    live = LiveCluster(
        cluster, migrator, executors, clock=clock, on_token=on_token, on_finish=on_finish,
        max_step_failures=max_step_failures, record_batches=record_batches,
        retain_requests=retain_requests, max_context_tokens=limits.max_context_tokens,
        require_token_ids=require_ids, progress=progress,
    )
    return LiveSystem(live, adapters, limits)


def model_words(scenario: Scenario) -> str:
    """The model a live run loads, for a status line."""
    path = scenario.model.path
    return "the embedded demo model" if path is None else f"the model in {path}"


def workload_requests(scenario: Scenario) -> list[Request]:
    """The scenario's requests, identical to the ones `simulate` builds."""
    rng = np.random.default_rng(scenario.seed)
    return build_requests(scenario.workload, scenario.adapters.adapter_names(), rng, Path(scenario.base_dir))


def run(
    scenario: Scenario, requests: list[Request] | None = None,
    executor_factory: Callable[[int], Executor] | None = None, *, clock: Clock | None = None,
    record_batches: bool = False, progress: Callable[[int, int], None] | None = None,
    device: str | None = None, max_step_failures: int = 3,
    on_token: TokenCallback | None = None, on_finish: FinishCallback | None = None,
    on_created: Callable[[LiveCluster], None] | None = None,
    status: Callable[[str], None] | None = None,
) -> LiveResult:
    """Run a scenario live: its workload (or `requests`) is submitted at the arrival times,
    measured from the start on `clock` (wall time by default). Ends when every request is
    done, or at `run.horizon_s` with the rest reported unfinished. `on_created(live)` sees the
    LiveCluster before it starts (the Ray backend hooks replica restarts there); `status`
    hears each stage (loading the model, replaying the requests)."""
    if requests is None:
        requests = workload_requests(scenario)
    clock = clock or MonotonicClock()
    system = create_live_cluster(
        scenario, executor_factory, clock=clock, device=device, on_token=on_token,
        on_finish=on_finish, max_step_failures=max_step_failures, record_batches=record_batches,
        progress=progress, status=status)
    prepare_requests(requests, scenario.seed, system.limits.vocab_size)
    live = system.live
    if on_created is not None:
        on_created(live)
    reset = getattr(clock, "reset", None)
    if reset is not None:
        reset()  # arrival times count from here, not from the model load
    if status is not None:
        span = max((r.arrival_s for r in requests), default=0.0)
        status(f"replaying {len(requests)} requests live (arrivals over {seconds(span)})")
    wall0 = time.perf_counter()
    cpu0 = machine_load.sample()
    live.start(replay=requests)
    try:
        live.wait(scenario.run.horizon_s)
        end_s = live.now()
    finally:
        live.stop()
    wall = time.perf_counter() - wall0
    stats = live.stats.as_dict()
    stats.update(wall_s=wall, replicas_alive=sum(r.is_alive for r in live.cluster.replicas),
                 machine=machine_load.other_load(cpu0, machine_load.sample()))
    return LiveResult(scenario, requests, live.cluster, live.migrator, system.adapters, end_s, wall,
                      live.queue_samples, live.batch_log, stats)


def build_live_report(result: LiveResult) -> Report:
    """The simulator's report plus `live`: scheduler share, failures, transfers."""
    report = build_report(result)
    report.extra["live"] = result.live
    return report


def scheduler_note(live: dict[str, Any]) -> str:
    """The live run's scheduling overhead in words: "dlora's own scheduling took 60% of the
    iteration time: 3.81 ms per iteration against 2.5 ms of model step (1,215 iterations)"."""
    return (f"dlora's own scheduling took {live['scheduler_share'] * 100:.0f}% of the iteration time: "
            f"{seconds(live['scheduler_us_per_iteration'] * 1e-6)} per iteration against "
            f"{seconds(live['executor_ms_per_iteration'] * 1e-3)} of model step "
            f"({count(live['iterations'])} iterations)")


def run_live(scenario: Scenario, out_dir: Path | None,
             progress: Callable[[int, int], None] | None = None,
             ray_address: str | None = None,
             status: Callable[[str], None] | None = None) -> tuple[Outcome, bool]:
    """`dlora run`: the outcome to print and whether every request completed. With
    `ray_address` ("local" starts a local Ray), each replica is a Ray actor; a killed actor's
    requests are recomputed on live replicas and the actor is restarted. `status` hears each
    stage as it starts (`output.StatusLine`)."""
    if status is not None:
        status(f"preparing {scenario.name}: {scenario.cluster.replicas} replica(s)"
               f"{' as Ray actors' if ray_address else ''}")
    if ray_address is None:
        result = run(scenario, progress=progress, status=status)
    else:
        from .ray_replicas import ray_run_hooks

        factory, on_created = ray_run_hooks(scenario, ray_address)
        result = run(scenario, executor_factory=factory, progress=progress, max_step_failures=1,
                     on_created=on_created, status=status)
    if status is not None and out_dir is not None:
        status(f"writing the report and plots to {out_dir}")
    report = build_live_report(result)
    s, live = report.summary, result.live
    outcome = Outcome(report=report)
    outcome.notes.append(f"ran {len(result.requests)} requests live in {seconds(result.wall_s)} wall")
    outcome.notes.append(scheduler_note(live))
    warning = None if ray_address else machine_load.busy_warning(live.get("machine", {}))
    if warning:
        outcome.notes.append(warning)
    if live["failed_steps"]:
        outcome.notes.append(f"{live['failed_steps']} failed steps ({live['requeued_requests']} requests "
                             f"requeued); dead replicas: {live['dead_replicas'] or 'none'}")
    if out_dir is not None:
        outcome.paths = write_outputs(out_dir, report, result.requests, scenario.adapters.adapter_names(),
                                      result.queue_samples)
        outcome.notes.append(f"wrote {', '.join(p.name for p in outcome.paths)} to {out_dir}")
    ok = s["completed"] == s["requests"]
    if not ok:
        outcome.notes.append(f"{s['requests'] - s['completed']} requests did not complete")
    return outcome, ok
