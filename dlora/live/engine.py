"""LiveCluster: the core's Cluster driven by threads on a clock (DESIGN.md section 3, live side).

One worker thread per replica schedules under the cluster lock, runs its executor outside the
lock (so executors run in parallel) and completes under the lock; an idle worker waits on a
condition. A replay thread submits a workload at its arrival times; timers run the migrator
and the placement. Hooks for an HTTP server: `submit` (thread-safe, returns at once),
`abort`, `on_token(request, token_id)` / `on_finish(request)` callbacks, `wait`, `stop`.

Failures: a request the executor blames (`StepResult.faults`) fails alone (worker.py); a step
that raises or returns `StepResult.error` is a fault of the replica: counted, and its requests
are requeued by `ReplicaScheduler.complete` (recompute); a replica failing `max_step_failures`
steps in a row is marked dead, its requests move to live replicas, and the `restart` hook (if
given) rebuilds its executor on a thread of its own, then calls `revive`. Migration moves a
request with its adapter (the core's actions); a KV transfer is exported by the source's
worker before its next step and imported by the destination's worker (kv_transfer.py);
requests in a step in flight are not moved until the step ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from ..core.cluster import Cluster
from ..core.migration import Migrator
from ..core.replica import ReplicaScheduler
from ..errors import DloraError
from ..report import note_queue_length
from ..types import Batch, Executor, Request, RequestStatus
from .callbacks import FinishCallback, Outbox, TokenCallback
from .clock import SWITCH_INTERVAL, Clock, MonotonicClock
from .kv_transfer import KVMailbox
from .moves import Moves
from .stats import LiveStats
from .worker import ReplicaWorker

log = logging.getLogger(__name__)
EPS_S = 1e-9
RESTART_BACKOFF_S, RESTART_BACKOFF_MAX_S = 0.5, 30.0


class LiveCluster:
    """Threads driving `cluster` with one executor per replica (see the module docstring)."""

    def __init__(
        self, cluster: Cluster, migrator: Migrator, executors: Sequence[Executor], *,
        clock: Clock | None = None, on_token: TokenCallback | None = None,
        on_finish: FinishCallback | None = None, max_step_failures: int = 3,
        record_batches: bool = False, retain_requests: bool = True,
        max_context_tokens: int | None = None, require_token_ids: bool = False,
        transfer_timeout_s: float = 30.0, progress: Callable[[int, int], None] | None = None,
        restart: Callable[[int], None] | None = None,
    ) -> None:
        if len(executors) != len(cluster.replicas):
            raise ValueError("one executor per replica")
        self.cluster, self.migrator, self.executors = cluster, migrator, list(executors)
        self.clock: Clock = clock or MonotonicClock()
        self.progress = progress
        self.max_step_failures = max_step_failures
        self.max_context_tokens, self.require_token_ids = max_context_tokens, require_token_ids
        self.retain_requests = retain_requests
        self.restart = restart  # replica id -> rebuild its executor (the replica is dead)
        n = len(cluster.replicas)
        self.restarts = [0] * n  # restarts since the replica's last good step
        self.adapter_faults: dict[int, str] = {}  # adapter id -> why it is broken (first fault)
        self.suspects: dict[int, int] = {}  # request id -> dying replicas whose last step it was in
        self._lock = threading.Lock()
        self.wakes = [self.clock.condition(self._lock) for _ in range(n)]
        self._timer = self.clock.condition(self._lock)
        self._done = self.clock.condition(self._lock)
        self._in_flight: set[int] = set()  # request ids in steps being executed
        self._aborts: set[int] = set()  # abort requested while the request's step runs
        self.kv = KVMailbox(n, transfer_timeout_s) if all(
            hasattr(e, "export_kv") and hasattr(e, "import_kv") for e in self.executors) else None
        self.outbox = Outbox(on_token, on_finish)
        self._replay: list[Request] = []
        self._replaying = False
        self._stopping = False
        self._started = False
        self._threads: list[threading.Thread] = []
        self._next_id = 0
        self.unfinished = 0
        self.total = self.done = 0
        self.stats = LiveStats()
        self.moves = Moves(cluster, self.kv, self.stats, self.wakes, self.finish_request)
        self.workers = [ReplicaWorker(self, i) for i in range(n)]
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
            # Worker, arrival and server threads hand the GIL to each other every iteration;
            # the default 5 ms switch interval would add up to that much to every hand-off
            # (TTFT). `stop` puts the process's value back.
            SWITCH_INTERVAL.shorten()
            self._replay = list(replay)
            self._replaying = bool(self._replay)
            self.unfinished += len(self._replay)
            self.total += len(self._replay)
            self._next_id = max((r.id + 1 for r in self._replay), default=0)
        self.clock.attach()
        self.cluster.place(self.clock.now(), initial=True)
        place_s = getattr(self.cluster.placer, "interval_s", None)
        if place_s:  # threads start in the simulator's process order (parity)
            self._spawn("dlora-placement", partial(self._timer_loop, float(place_s), self._place))
        if self._replay:
            self._spawn("dlora-arrivals", self._arrivals)
        for i in range(len(self.cluster.replicas)):
            self._spawn(f"dlora-replica-{i}", partial(self._worker, i))
        if self.migrator.interval_s:
            self._spawn("dlora-migration", partial(self._timer_loop, self.migrator.interval_s, self._migrate))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        self._threads.append(self.clock.start_thread(target, name))

    @property
    def lock(self) -> threading.Lock:
        """The cluster lock: hold it to change scheduler tables (e.g. register an adapter)."""
        return self._lock

    def revive(self, replica_id: int, join_timeout_s: float = 60.0) -> bool:
        """Bring a dead replica back (its executor was restarted): alive again, with a new
        worker. False if it is alive or the cluster is stopping."""
        rep, name = self.cluster.replicas[replica_id], f"dlora-replica-{replica_id}"
        old = [t for t in self._threads if t.name == name]
        for t in old:  # a dead replica's worker ends after its last step
            if not rep.is_alive:
                t.join(join_timeout_s)
        with self._lock:
            if self._stopping or rep.is_alive:
                return False
            rep.is_alive = True
            self.workers[replica_id].failures = 0
            self._threads = [t for t in self._threads if t not in old]
            self._spawn(name, partial(self._worker, replica_id))
        log.warning("replica %d is back", replica_id)
        return True

    # ---- the workers' surface (worker.py; the lock held) ----
    @property
    def is_stopping(self) -> bool:
        return self._stopping

    def step_started(self, replica_id: int, batch: Batch) -> None:
        """`batch` goes to replica `replica_id`'s executor: its requests are in flight."""
        self._in_flight.update(batch.request_ids)
        if self.batch_log is not None:
            self.batch_log.append((replica_id, batch.step, str(batch.mode), batch.merged_adapter,
                                   batch.request_ids))

    def step_ended(self, batch: Batch, now: float) -> None:
        """`batch` was completed: its requests are no longer in flight; aborts that waited for
        the step happen now."""
        self._in_flight.difference_update(batch.request_ids)
        if self._aborts:
            for r in batch.requests:
                if r.id in self._aborts:
                    self._aborts.discard(r.id)
                    self._abort_now(r, now)

    def replica_finished(self, rep: ReplicaScheduler, finished: list[Request], now: float) -> None:
        """Requests that `rep` finished in a step: the cluster's books, callbacks, queue length."""
        self.cluster.on_finished(finished)
        for r in finished:
            self.finish_request(r)
        self._sample(rep, now)

    def fail_request(self, r: Request, message: str) -> None:
        """`r` (aborted in its scheduler) failed alone: say why and finish it."""
        r.finish_reason, r.error = "error", message
        self._aborts.discard(r.id)
        if self.kv is not None:
            self.kv.forget(r.id)
        self.stats.failed_requests += 1
        self.finish_request(r)

    def mark_dead(self, replica_id: int, now: float) -> None:
        """Replica `replica_id` is dead: move its requests to live replicas (moves.py), then
        rebuild and revive it where there is a `restart` hook."""
        self.moves.evacuate(self.cluster.replicas[replica_id], now)
        self._replica_dead(replica_id)

    def _replica_dead(self, replica_id: int) -> None:
        """A replica was evacuated (lock held): rebuild and revive it on a thread of its own,
        after a back-off that doubles with each restart that did not serve a good step."""
        if self.restart is None or self._stopping:
            return
        k = self.restarts[replica_id]
        self.restarts[replica_id] = k + 1
        delay_s = 0.0 if k == 0 else min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** (k - 1))
        restart = self.restart

        def run() -> None:
            if delay_s:
                time.sleep(delay_s)
            if self._stopping:
                return
            try:
                restart(replica_id)
            except Exception:  # noqa: BLE001  (the replica stays dead; the others serve)
                log.exception("restarting replica %d failed", replica_id)
                return
            if self.revive(replica_id):
                with self._lock:
                    self.stats.restarts += 1

        threading.Thread(target=run, name=f"dlora-restart-{replica_id}", daemon=True).start()

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
        self.outbox.deliver()
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
        self.outbox.deliver()
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
            for c in (*self.wakes, self._timer, self._done):
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
        SWITCH_INTERVAL.restore()

    def now(self) -> float:
        return self.clock.now()

    # ---- threads ----
    def _worker(self, i: int) -> None:
        self.workers[i].run()

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
        self.outbox.deliver()

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
        self.moves.apply(self.migrator.plan(self.cluster.view(now), now), now)

    def _place(self, now: float) -> None:
        for rep in self.cluster.place(now):
            self.wakes[rep.id].notify_all()

    # ---- helpers (the lock held) ----
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
            except Exception as exc:  # noqa: BLE001  (a failing dispatcher must not lose it)
                log.exception("dispatching request %d failed", r.id)
                reason = f"dispatch failed: {type(exc).__name__}: {exc}"
        if replica is None:
            if reason is not None:
                self.cluster.requests[r.id] = r
                self.cluster.reject(r, now, reason)
            self.finish_request(r)
            return False
        self._sample(replica, now)
        self.wakes[replica.id].notify_all()
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
        self.finish_request(r)

    def finish_request(self, r: Request) -> None:
        """`r` is done (finished, failed, aborted or rejected): count it, call back (lock held)."""
        if self.suspects:
            self.suspects.pop(r.id, None)
        self.unfinished -= 1
        self.done += 1
        self.outbox.finish(r)
        if not self.retain_requests:
            self.cluster.requests.pop(r.id, None)
            if self.cluster.rejected and self.cluster.rejected[-1] is r:
                self.cluster.rejected.pop()
        if self.progress is not None:
            self.progress(self.done, self.total)
        if not self.unfinished and not self._replaying:
            self._done.notify_all()

    def _sample(self, rep: ReplicaScheduler, now: float) -> None:
        note_queue_length(self.queue_samples[rep.id], now, rep.num_unfinished)
