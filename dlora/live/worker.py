"""One replica's worker loop (DESIGN.md section 3): schedule under the cluster lock, run the
executor outside it, complete under it; wait on the replica's condition when idle.

Before each schedule the worker runs the migrations that waited for its previous step and
exports the KV of requests that left it by transfer (before its next step frees them).

Faults: a request the executor reports in `StepResult.faults` fails alone (aborted in the
scheduler, finish_reason "error", `Request.error` says why; never retried elsewhere) and the
step counts as a good one; its adapter is flagged when blamed (`LiveCluster.adapter_faults`).
A step that raises or returns an error is a fault of the replica: counted and requeued by the
core; after `max_step_failures` failures in a row the replica is evacuated (moves.py) and,
where the live cluster has a `restart` hook, rebuilt and revived. A request that was in the
last failing step of `MAX_REPLICA_DEATHS` dying replicas fails alone rather than moving on."""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from ..core.cluster import Cluster
from ..core.replica import ReplicaScheduler
from ..types import Batch, Executor, Request, RequestFault, RequestStatus, StepResult
from .callbacks import Outbox
from .clock import Clock, Condition
from .kv_transfer import KVMailbox, TransferError
from .moves import Moves
from .stats import LiveStats

log = logging.getLogger(__name__)
MAX_REPLICA_DEATHS = 2  # a request in the failing steps of this many dying replicas fails alone


class WorkerHost(Protocol):
    """What a worker reads and calls on its live cluster (`LiveCluster`); the methods are called
    with `lock` held."""

    cluster: Cluster
    clock: Clock
    executors: list[Executor]
    wakes: list[Condition]
    kv: KVMailbox | None
    moves: Moves
    outbox: Outbox
    stats: LiveStats
    max_step_failures: int
    restarts: list[int]  # restarts since the replica's last good step
    suspects: dict[int, int]  # request id -> dying replicas whose last step it was in
    adapter_faults: dict[int, str]  # adapter id -> why it is broken

    @property
    def lock(self) -> threading.Lock: ...
    @property
    def is_stopping(self) -> bool: ...
    def step_started(self, replica_id: int, batch: Batch) -> None: ...
    def step_ended(self, batch: Batch, now: float) -> None: ...
    def replica_finished(self, rep: ReplicaScheduler, finished: list[Request], now: float) -> None: ...
    def fail_request(self, r: Request, message: str) -> None: ...
    def mark_dead(self, replica_id: int, now: float) -> None: ...


class ReplicaWorker:
    def __init__(self, live: WorkerHost, replica_id: int) -> None:
        self.live = live
        self.id = replica_id
        self.rep = live.cluster.replicas[replica_id]
        self.executor = live.executors[replica_id]
        self.wake = live.wakes[replica_id]
        self.failures = 0  # failed steps in a row

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug in the loop or the core: never strand the replica's requests
            log.exception("replica %d worker crashed; evacuating it", self.id)
            with self.live.lock:
                if self.rep.is_alive:
                    self.live.mark_dead(self.id, self.live.clock.now())
            self.live.outbox.deliver()

    def _loop(self) -> None:
        live = self.live
        while True:
            with live.lock:
                nxt = self._next()
                if nxt is None:
                    return
                batch, exports = nxt
            if exports:
                assert live.kv is not None
                live.kv.export(self.executor, exports)
            if batch is None:
                continue
            result, exec_s, kind = self._execute(batch)
            live.clock.sleep(result.elapsed_s)
            with live.lock:
                self._complete(batch, result, exec_s, kind)
            live.outbox.deliver()

    def _next(self) -> tuple[Batch | None, list[int]] | None:
        """The next batch and KV exports (lock held); None: stop."""
        live, rep, i = self.live, self.rep, self.id
        while True:
            if live.is_stopping or not rep.is_alive:
                if live.kv is not None:
                    live.kv.fail_exports(i)
                return None
            now = live.clock.now()
            live.cluster.end_step(i)
            if live.cluster.deferred:  # migrations that waited for this replica's step
                live.moves.run_deferred(i, now)
            exports = live.kv.take_exports(i) if live.kv is not None else []
            t0, c0 = time.perf_counter(), time.thread_time()
            batch = rep.schedule(now)
            live.stats.schedule_s += time.perf_counter() - t0
            live.stats.scheduler_cpu_s += time.thread_time() - c0
            if batch is not None:
                live.cluster.begin_step(i, batch)
                live.step_started(i, batch)
            if batch is not None or exports:
                return batch, exports
            self.wake.wait()

    def _execute(self, batch: Batch) -> tuple[StepResult, float, str]:
        t0 = time.perf_counter()
        kind = "ok"
        kv = self.live.kv
        try:
            if batch.transfer_in and kv is not None:
                kv.import_(self.executor, batch.transfer_in)
            result = self.executor.execute(batch)
            if result.error is not None:
                kind = "error"
        except TransferError as exc:
            kind = "transfer"
            result = StepResult(time.perf_counter() - t0, error=str(exc))
        except Exception as exc:  # noqa: BLE001  (a failing executor must not kill its worker)
            kind = "raised"
            log.error("replica %d step %d raised %s: %s", self.id, batch.step, type(exc).__name__, exc,
                      exc_info=self.live.stats.executor_exceptions == 0)
            result = StepResult(time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
        return result, time.perf_counter() - t0, kind

    def _complete(self, batch: Batch, result: StepResult, exec_s: float, kind: str) -> None:
        """Apply the step (lock held): tokens, finishes, failures, aborts that waited."""
        live, rep = self.live, self.rep
        now = live.clock.now()
        t0, c0 = time.perf_counter(), time.thread_time()
        finished = rep.complete(batch, result, now)
        live.stats.complete_s += time.perf_counter() - t0
        live.stats.scheduler_cpu_s += time.thread_time() - c0
        live.stats.executor_s += exec_s
        live.stats.iterations += 1
        if result.error is not None:
            live.stats.record_failure(self.id, batch, result.error, kind)
            self.failures += kind != "transfer"  # a lost KV copy is not the replica's fault
        else:
            self.failures = 0
            live.restarts[self.id] = 0
            failed = self._fail_alone(batch, result.faults, finished, now) if result.faults else set()
            if result.logprobs is not None:  # asked for: kept beside the tokens they describe
                sampled = [r for it, r in zip(batch.items, batch.requests, strict=True) if it.samples]
                for r, lp in zip(sampled, result.logprobs, strict=True):
                    if lp is not None and r.id not in failed:
                        r.output_logprobs.append(lp)
            if result.token_ids is not None and live.outbox.on_token is not None:
                for item, r in zip(batch.items, batch.requests, strict=True):
                    if item.samples and r.id not in failed:
                        live.outbox.token(r, r.output_token_ids[-1])
        if finished:
            live.replica_finished(rep, finished, now)
        live.step_ended(batch, now)
        if self.failures >= live.max_step_failures and rep.is_alive:
            log.error("replica %d failed %d steps in a row", self.id, self.failures)
            if kind != "transfer":
                self._blame_deaths(batch, now)
            live.mark_dead(self.id, now)

    def _fail_alone(self, batch: Batch, faults: tuple[RequestFault, ...], finished: list[Request],
                    now: float) -> set[int]:
        """Fail the requests the executor blamed, alone (lock held); their ids."""
        live, rep = self.live, self.rep
        at = {r.id: j for j, r in enumerate(batch.requests)}
        failed: set[int] = set()
        for f in faults:
            j = at.get(f.request_id)
            if j is None or f.request_id in failed:
                continue
            r = batch.requests[j]
            failed.add(r.id)
            if r in finished:  # the core ended it on the placeholder token
                finished.remove(r)
                r.status = RequestStatus.ABORTED
            elif not r.is_done:
                rep.abort(r, now)
            else:
                continue  # aborted already (client gone)
            if batch.items[j].samples and r.output_token_ids:  # drop the placeholder
                r.output_token_ids.pop()
                r.generated_tokens -= 1
            if f.adapter_id is not None and f.adapter_id not in live.adapter_faults:
                live.adapter_faults[f.adapter_id] = f.message
                log.error("adapter %d flagged as broken: %s", f.adapter_id, f.message)
            self.live.fail_request(r, f.message)
        return failed

    def _blame_deaths(self, batch: Batch, now: float) -> None:
        """The replica dies on `batch` (lock held): a request that was in the last failing
        step of `MAX_REPLICA_DEATHS` dying replicas fails alone instead of moving on (a fault
        no executor could pin on it must not take every replica down in turn)."""
        live = self.live
        if not any(o.is_alive for o in live.cluster.replicas if o is not self.rep):
            return  # nowhere to move: every request is rejected anyway
        for r in batch.requests:
            if r.is_done:
                continue
            deaths = live.suspects[r.id] = live.suspects.get(r.id, 0) + 1
            if deaths >= MAX_REPLICA_DEATHS:
                log.error("request %d was in the failing steps of %d dying replicas; failing it",
                          r.id, deaths)
                self.rep.abort(r, now)
                self.live.fail_request(r, f"the request was in the failing steps of {deaths} replicas "
                                "that died; it is not retried again")
