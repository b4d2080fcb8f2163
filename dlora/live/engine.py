"""LiveCluster: the core's Cluster driven by threads on a clock (DESIGN.md section 3, live side).

One worker thread per replica schedules under the cluster lock, runs its executor outside the
lock (so executors run in parallel) and completes under the lock; an idle worker waits on a
condition. A replay thread submits a workload at its arrival times; timers run the migrator
and the placement. Hooks for an HTTP server: `submit` (thread-safe, returns at once),
`abort`, `on_token(request, token_id)` / `on_finish(request)` callbacks, `wait`, `stop`.

Failures: a step that raises or returns `StepResult.error` is counted and its requests are
requeued by `ReplicaScheduler.complete` (recompute); a replica failing `max_step_failures`
steps in a row is marked dead and its requests move to live replicas. Migration moves a
request with its adapter (the core's actions); a KV transfer is exported by the source's
worker before its next step and imported by the destination's worker (kv_transfer.py);
requests in a step in flight are not moved until the step ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..core.cluster import Cluster
from ..core.migration import Migrator
from ..core.replica import ReplicaScheduler
from ..errors import DloraError
from ..types import Action, Batch, Executor, MigrateMode, MigrateRequest, Request, RequestStatus, StepResult
from .clock import Clock, MonotonicClock
from .kv_transfer import KVMailbox, TransferError
from .stats import LiveStats

log = logging.getLogger(__name__)
EPS_S = 1e-9
TokenCallback = Callable[[Request, int], None]
FinishCallback = Callable[[Request], None]


class LiveCluster:
    """Threads driving `cluster` with one executor per replica (see the module docstring)."""

    def __init__(
        self, cluster: Cluster, migrator: Migrator, executors: Sequence[Executor], *,
        clock: Clock | None = None, on_token: TokenCallback | None = None,
        on_finish: FinishCallback | None = None, max_step_failures: int = 3,
        record_batches: bool = False, retain_requests: bool = True,
        max_context_tokens: int | None = None, require_token_ids: bool = False,
        transfer_timeout_s: float = 30.0, progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if len(executors) != len(cluster.replicas):
            raise ValueError("one executor per replica")
        self.cluster, self.migrator, self.executors = cluster, migrator, list(executors)
        self.clock: Clock = clock or MonotonicClock()
        self.on_token, self.on_finish, self.progress = on_token, on_finish, progress
        self.max_step_failures = max_step_failures
        self.max_context_tokens, self.require_token_ids = max_context_tokens, require_token_ids
        self.retain_requests = retain_requests
        n = len(cluster.replicas)
        self._lock = threading.Lock()
        self._wake = [self.clock.condition(self._lock) for _ in range(n)]
        self._timer = self.clock.condition(self._lock)
        self._done = self.clock.condition(self._lock)
        self._in_flight: set[int] = set()  # request ids in steps being executed
        self._failures = [0] * n
        self._aborts: set[int] = set()  # abort requested while the request's step runs
        self.kv = KVMailbox(n, transfer_timeout_s) if all(
            hasattr(e, "export_kv") and hasattr(e, "import_kv") for e in self.executors) else None
        self._outbox: list[tuple[bool, Request, int]] = []
        self._deliver_lock = threading.RLock()
        self._replay: list[Request] = []
        self._replaying = False
        self._stopping = False
        self._started = False
        self._threads: list[threading.Thread] = []
        self._next_id = 0
        self.unfinished = 0
        self.total = self.done = 0
        self.stats = LiveStats()
        self.requests: list[Request] = []
        self.queue_samples: list[list[tuple[float, int]]] = [[] for _ in range(n)]
        self.batch_log: list[Any] | None = [] if record_batches else None

    # ---- the server's hooks ----
    def start(self, replay: Sequence[Request] = ()) -> None:
        """Start the threads; `replay` is submitted at its `arrival_s` times (in list order).
        The calling thread owns the run (a virtual clock runs it first)."""
        with self._lock:
            if self._started:
                raise DloraError("this live cluster was already started")
            self._started = True
            self._replay = list(replay)
            self._replaying = bool(self._replay)
            self.unfinished += len(self._replay)
            self.total += len(self._replay)
            self._next_id = max((r.id + 1 for r in self._replay), default=0)
        self.clock.attach()
        start = self.clock.start_thread
        self.cluster.place(self.clock.now(), initial=True)
        placer = self.cluster.placer
        if placer is not None and placer.interval_s:
            self._threads.append(start(lambda: self._timer_loop(placer.interval_s, self._place), "dlora-placement"))
        if self._replay:
            self._threads.append(start(self._arrivals, "dlora-arrivals"))
        for i in range(len(self.cluster.replicas)):
            self._threads.append(start(lambda i=i: self._worker(i), f"dlora-replica-{i}"))
        if self.migrator.interval_s:
            self._threads.append(start(lambda: self._timer_loop(self.migrator.interval_s, self._migrate), "dlora-migration"))

    def next_request_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id - 1

    def submit(self, request: Request, arrival_s: float | None = None) -> bool:
        """Dispatch a request now (its `arrival_s` becomes the clock's now unless given).
        Returns False if it was rejected (`finish_reason` says why; on_finish is called)."""
        with self._lock:
            if self._stopping or not self._started:
                raise DloraError("the live cluster is not running; start() it first")
            now = self.clock.now()
            request.arrival_s = now if arrival_s is None else arrival_s
            self.unfinished += 1
            self.total += 1
            self._next_id = max(self._next_id, request.id + 1)
            ok = self._submit(request, now)
        self._deliver()
        return ok

    def abort(self, request_id: int) -> bool:
        """Cancel an unfinished request (client gone): frees its KV and calls on_finish with
        finish_reason "abort". False if unknown or already done."""
        with self._lock:
            r = self.cluster.requests.get(request_id)
            if r is None or r.is_done:
                return False
            if request_id in self._in_flight:
                self._aborts.add(request_id)  # the worker aborts it when the step ends
            else:
                self._abort_now(r, self.clock.now())
        self._deliver()
        return True

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted request is done (True) or `timeout_s` passes (False)."""
        with self._lock:
            deadline = None if timeout_s is None else self.clock.now() + timeout_s
            while (self.unfinished or self._replaying) and not self._stopping:
                if getattr(self.clock, "stalled", False):
                    break
                if deadline is None:
                    self._done.wait()
                    continue
                left = deadline - self.clock.now()
                if left <= EPS_S:
                    break
                self._done.wait(left)
            return not (self.unfinished or self._replaying)

    def stop(self, join_timeout_s: float = 60.0) -> None:
        """Stop every thread (steps in flight finish first). Idempotent."""
        with self._lock:
            already = self._stopping
            self._stopping = True
            for c in (*self._wake, self._timer, self._done):
                c.notify_all()
        if self.kv is not None:
            self.kv.close()
        if already or not self._started:
            return
        self.clock.detach()
        for t in self._threads:
            t.join(join_timeout_s)
            if t.is_alive():
                log.warning("thread %s did not stop within %.0f s", t.name, join_timeout_s)

    def now(self) -> float:
        return self.clock.now()

    # ---- threads ----
    def _worker(self, i: int) -> None:
        rep, ex, wake = self.cluster.replicas[i], self.executors[i], self._wake[i]
        while True:
            with self._lock:
                while True:
                    if self._stopping or not rep.is_alive:
                        if self.kv is not None:
                            self.kv.fail_exports(i)
                        return
                    now = self.clock.now()
                    self.cluster.in_flight[i] = ()
                    if self.cluster.deferred:  # migrations that waited for this replica's step
                        self._run_deferred(i, now)
                    exports = self.kv.take_exports(i) if self.kv is not None else []
                    t0, c0 = time.perf_counter(), time.thread_time()
                    batch = rep.schedule(now)
                    self.stats.schedule_s += time.perf_counter() - t0
                    self.stats.scheduler_cpu_s += time.thread_time() - c0
                    if batch is not None or exports:
                        break
                    wake.wait()
                if batch is not None:
                    self.cluster.in_flight[i] = batch.request_ids
                    self._in_flight.update(batch.request_ids)
                    if self.batch_log is not None:
                        self.batch_log.append((i, batch.step, str(batch.mode), batch.merged_adapter, batch.request_ids))
            if exports:
                assert self.kv is not None
                self.kv.export(ex, exports)
            if batch is None:
                continue
            result, exec_s, kind = self._execute(i, ex, batch)
            self.clock.sleep(result.elapsed_s)
            with self._lock:
                self._in_flight.difference_update(batch.request_ids)
                now = self.clock.now()
                t0, c0 = time.perf_counter(), time.thread_time()
                finished = rep.complete(batch, result, now)
                self.stats.complete_s += time.perf_counter() - t0
                self.stats.scheduler_cpu_s += time.thread_time() - c0
                self.stats.executor_s += exec_s
                self.stats.iterations += 1
                self._after_step(rep, batch, result, finished, kind, now)
            self._deliver()

    def _execute(self, i: int, ex: Executor, batch: Batch) -> tuple[StepResult, float, str]:
        t0 = time.perf_counter()
        kind = "ok"
        try:
            if batch.transfer_in and self.kv is not None:
                self.kv.import_(ex, batch.transfer_in)
            result = ex.execute(batch)
            if result.error is not None:
                kind = "error"
        except TransferError as exc:
            kind = "transfer"
            result = StepResult(time.perf_counter() - t0, error=str(exc))
        except Exception as exc:  # noqa: BLE001  (a failing executor must not kill its worker)
            kind = "raised"
            log.error("replica %d step %d raised %s: %s", i, batch.step, type(exc).__name__, exc,
                      exc_info=self.stats.executor_exceptions == 0)
            result = StepResult(time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
        return result, time.perf_counter() - t0, kind

    def _after_step(self, rep: ReplicaScheduler, batch: Batch, result: StepResult,
                    finished: list[Request], kind: str, now: float) -> None:
        i = rep.id
        if result.error is not None:
            self.stats.record_failure(i, batch, result.error, kind)
            if kind != "transfer":
                self._failures[i] += 1
        else:
            self._failures[i] = 0
            if result.token_ids is not None and self.on_token is not None:
                for item, r in zip(batch.items, batch.requests, strict=True):
                    if item.samples:
                        self._outbox.append((False, r, r.output_token_ids[-1]))
        if finished:
            self.cluster.on_finished(finished)
            for r in finished:
                self._finished(r)
            self._sample(rep, now)
        if self._aborts:
            for r in batch.requests:
                if r.id in self._aborts:
                    self._aborts.discard(r.id)
                    self._abort_now(r, now)
        if self._failures[i] >= self.max_step_failures and rep.is_alive:
            self._kill(rep, now)

    def _arrivals(self) -> None:
        with self._lock:
            for r in self._replay:
                if self._stopping:
                    return
                delay = r.arrival_s - self.clock.now()
                if delay > 0:
                    self._timer.wait(delay)
                    while not self._stopping and self.clock.now() < r.arrival_s - EPS_S:
                        self._timer.wait(r.arrival_s - self.clock.now())
                    if self._stopping:
                        return
                self._submit(r, self.clock.now())
            self._replaying = False
            if not self.unfinished:
                self._done.notify_all()
        self._deliver()

    def _timer_loop(self, interval_s: float, action: Callable[[float], None]) -> None:
        with self._lock:
            while not self._stopping:
                deadline = self.clock.now() + interval_s
                self._timer.wait(interval_s)
                while not self._stopping and self.clock.now() < deadline - EPS_S:
                    self._timer.wait(deadline - self.clock.now())
                if self._stopping:
                    return
                action(self.clock.now())

    def _migrate(self, now: float) -> None:
        actions = self.migrator.plan(self.cluster.view(now), now)
        self._apply(actions, now)

    def _place(self, now: float) -> None:
        for rep in self.cluster.place(now):
            self._wake[rep.id].notify_all()

    # ---- helpers (the lock held) ----
    def _apply(self, actions: Sequence[Action], now: float) -> None:
        """Migrations and placement changes; a move of a request in a step in flight waits
        for the step (Cluster.deferred), one whose KV is still on its way is dropped."""
        pending = self.kv.pending if self.kv is not None else set()
        safe = [a for a in actions if not (isinstance(a, MigrateRequest) and a.request_id in pending)]
        self.stats.dropped_migrations += len(actions) - len(safe)
        transfers = self._transfers(safe)
        for rep in self.cluster.apply(safe, now):
            self._wake[rep.id].notify_all()
        self._expect_kv(transfers)

    def _run_deferred(self, i: int, now: float) -> None:
        acts = self.cluster.deferred.get(i, [])
        self.stats.deferred_migrations += len(acts)
        transfers = self._transfers(acts)
        for dst in self.cluster.run_deferred(i, now):
            self._wake[dst.id].notify_all()
        self._expect_kv(transfers)

    def _transfers(self, actions: Sequence[Action]) -> list[MigrateRequest]:
        """The KV-transfer moves whose request holds KV on its source now."""
        if self.kv is None:
            return []
        return [a for a in actions if isinstance(a, MigrateRequest) and a.mode == MigrateMode.TRANSFER
                and self._has_kv(a.request_id, a.source)]

    def _expect_kv(self, transfers: list[MigrateRequest]) -> None:
        """Register the copies of the moves that happened (deferred ones register later)."""
        for act in transfers:
            r = self.cluster.requests[act.request_id]
            if r.replica == act.destination and r.computed_tokens > 0 and self.kv is not None:
                self.kv.expect(act.source, r.id)
                self.stats.kv_transfers += 1
                self._wake[act.source].notify_all()

    def _has_kv(self, request_id: int, replica: int) -> bool:
        r = self.cluster.requests.get(request_id)
        return r is not None and not r.is_done and r.replica == replica and r.computed_tokens > 0

    def _submit(self, r: Request, now: float) -> bool:
        if self.retain_requests:
            self.requests.append(r)
        reason = self._unservable(r)
        replica: ReplicaScheduler | None = None
        if reason is None:
            try:
                replica = self.cluster.submit(r, now)
            except RuntimeError as exc:  # no live replica
                reason = str(exc)
        if replica is None:
            if reason is not None:
                self.cluster.requests[r.id] = r
                self.cluster.reject(r, now, reason)
            self._finished(r)
            return False
        self._sample(replica, now)
        self._wake[replica.id].notify_all()
        return True

    def _unservable(self, r: Request) -> str | None:
        if self.require_token_ids and r.prompt_token_ids is None:
            return "live mode needs prompt_token_ids"
        need = r.prompt_tokens + r.output_tokens
        if self.max_context_tokens is not None and need > self.max_context_tokens:
            return f"needs {need} tokens of context, the model holds {self.max_context_tokens}"
        return None

    def _abort_now(self, r: Request, now: float) -> None:
        if r.is_done:
            return
        if r.replica is not None:
            self.cluster.replicas[r.replica].abort(r, now)
        else:
            r.status, r.finish_s, r.finish_reason = RequestStatus.ABORTED, now, "abort"
        if self.kv is not None:
            self.kv.forget(r.id)
        self.stats.aborted += 1
        self._finished(r)

    def _kill(self, rep: ReplicaScheduler, now: float) -> None:
        """Mark a replica dead and move its requests to live replicas (recomputed there)."""
        rep.is_alive = False
        self.stats.dead_replicas.append(rep.id)
        self.cluster.in_flight[rep.id] = ()
        self.cluster.deferred.pop(rep.id, None)
        moving = list(rep.unfinished)
        log.error("replica %d failed %d steps in a row: marked dead; moving its %d requests",
                  rep.id, self._failures[rep.id], len(moving))
        for r in moving:
            rep.remove(r)
            if self.kv is not None:
                self.kv.forget(r.id)
            r.computed_tokens = 0
            r.status = RequestStatus.WAITING
            try:
                dst = self.cluster.dispatcher.choose(r, self.cluster.view(now), now)
            except RuntimeError:
                self.cluster.reject(r, now, "every replica failed")
                self._finished(r)
                continue
            self.cluster.replicas[dst].add(r, now)
            self.stats.moved_from_dead += 1
            self._wake[dst].notify_all()
        self._wake[rep.id].notify_all()

    def _finished(self, r: Request) -> None:
        self.unfinished -= 1
        self.done += 1
        if self.on_finish is not None:
            self._outbox.append((True, r, -1))
        if not self.retain_requests:
            self.cluster.requests.pop(r.id, None)
            if self.cluster.rejected and self.cluster.rejected[-1] is r:
                self.cluster.rejected.pop()
        if self.progress is not None:
            self.progress(self.done, self.total)
        if not self.unfinished and not self._replaying:
            self._done.notify_all()

    def _sample(self, rep: ReplicaScheduler, now: float) -> None:
        samples = self.queue_samples[rep.id]
        n = len(rep.unfinished)
        if not samples or samples[-1][1] != n:
            samples.append((now, n))

    # ---- callbacks, in production order, outside the cluster lock ----
    def _deliver(self) -> None:
        if self.on_token is None and self.on_finish is None:
            return
        with self._deliver_lock:
            while True:
                with self._lock:
                    events, self._outbox = self._outbox, []
                if not events:
                    return
                for is_finish, r, token in events:
                    try:
                        if is_finish:
                            self.on_finish(r)  # type: ignore[misc]
                        else:
                            self.on_token(r, token)  # type: ignore[misc]
                    except Exception:  # noqa: BLE001  (a callback must not stop the cluster)
                        log.exception("callback for request %d failed", r.id)
