"""Clocks of the live driver: the real monotonic clock, and a virtual clock for parity tests.

The live driver reads time, waits and starts its threads only through a clock:
`now()`, `condition(lock)` (a condition variable bound to the cluster lock),
`start_thread(target, name)`, `sleep(seconds)` (called after an executor step that took
`seconds` of this clock's time: a no-op on the real clock, where the step already took them),
and `attach()` / `detach()` for the thread that owns a run. `SWITCH_INTERVAL`: the process's GIL
switch interval, shortened while any live cluster runs.

`VirtualClock` runs the driver's threads one at a time in SimPy's order: a thread runs until
it waits or sleeps; then the earliest pending wake-up (time, then the order in which waits,
sleeps and notifications were issued) runs next, and time jumps to it. With a scripted
executor this makes the live driver take exactly the simulator's decisions, independent of
how the operating system schedules threads (DESIGN.md section 9, sim/live parity).
"""

from __future__ import annotations

import heapq
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)
GIL_SWITCH_INTERVAL_S = 0.0005  # while live threads run (LiveCluster.start / stop)


class Condition(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...

    def notify_all(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def condition(self, lock: threading.Lock) -> Condition: ...

    def start_thread(self, target: Callable[[], None], name: str) -> threading.Thread: ...

    def sleep(self, seconds: float) -> None: ...

    def attach(self) -> None: ...

    def detach(self) -> None: ...


class MonotonicClock:
    """Wall time: seconds since construction (or `reset()`), from `time.monotonic`."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def reset(self) -> None:
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def condition(self, lock: threading.Lock) -> Condition:
        return threading.Condition(lock)

    def start_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        return t

    def sleep(self, seconds: float) -> None:
        """The executor step already took `seconds` of wall time."""

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass


class _Ticket:
    __slots__ = ("event", "gen", "waiting_on")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.gen = 0  # bumped when the ticket resumes; older heap entries are stale
        self.waiting_on: _VirtualCondition | None = None


class VirtualClock:
    """Discrete-event time for the live driver's threads (see the module docstring)."""

    def __init__(self) -> None:
        self._m = threading.Lock()
        self._now = 0.0
        self._seq = 0
        self._heap: list[tuple[float, int, int, _Ticket]] = []
        self._local = threading.local()
        self._running: _Ticket | None = None
        self._owner: _Ticket | None = None
        self.stalled = False  # every thread waited with nothing pending (a driver bug)

    def now(self) -> float:
        return self._now

    def condition(self, lock: threading.Lock) -> Condition:
        return _VirtualCondition(self, lock)

    # ---- participants ----
    def attach(self) -> None:
        """The calling thread takes part (the run's owner); it runs now if nobody else does."""
        tk = _Ticket()
        self._local.ticket = tk
        with self._m:
            self._owner = self._owner or tk
            if self._running is None:
                self._running = tk
                return
            self._push(self._now, tk)
        tk.event.wait()

    def detach(self) -> None:
        with self._m:
            if self._owner is self._ticket():
                self._owner = None
            self._handoff()

    def start_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        tk = _Ticket()
        with self._m:
            self._push(self._now, tk)

        def body() -> None:
            self._local.ticket = tk
            tk.event.wait()
            try:
                target()
            finally:
                with self._m:
                    self._handoff()

        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        return t

    # ---- blocking ----
    def sleep(self, seconds: float) -> None:
        tk = self._ticket()
        with self._m:
            tk.event.clear()
            self._push(self._now + max(0.0, seconds), tk)
            self._handoff()
        tk.event.wait()

    def _wait(self, cond: _VirtualCondition, timeout: float | None) -> None:
        tk = self._ticket()
        with self._m:
            tk.event.clear()
            if timeout is not None:
                self._push(self._now + max(0.0, timeout), tk)
            tk.waiting_on = cond
            cond.waiters.append(tk)
            self._handoff()
        cond.lock.release()
        tk.event.wait()
        cond.lock.acquire()

    def _notify(self, cond: _VirtualCondition) -> None:
        with self._m:
            for tk in cond.waiters:
                self._push(self._now, tk)
            cond.waiters.clear()

    # ---- internals (self._m held) ----
    def _ticket(self) -> _Ticket:
        tk = getattr(self._local, "ticket", None)
        if tk is None:
            raise RuntimeError("this thread is not attached to the VirtualClock")
        return tk

    def _push(self, at: float, tk: _Ticket) -> None:
        heapq.heappush(self._heap, (at, self._seq, tk.gen, tk))
        self._seq += 1

    def _handoff(self) -> None:
        """The running thread stops; resume the earliest pending ticket."""
        while self._heap:
            at, _, gen, tk = heapq.heappop(self._heap)
            if gen != tk.gen:
                continue
            tk.gen += 1
            if tk.waiting_on is not None:
                if tk in tk.waiting_on.waiters:
                    tk.waiting_on.waiters.remove(tk)
                tk.waiting_on = None
            self._now = max(self._now, at)
            self._running = tk
            tk.event.set()
            return
        self._running = None
        owner = self._owner
        if owner is not None:
            log.error("virtual clock stalled at %.6f s: every thread waits, nothing pending", self._now)
            self.stalled = True
            owner.gen += 1
            if owner.waiting_on is not None:
                owner.waiting_on.waiters.remove(owner)
                owner.waiting_on = None
            self._running = owner
            owner.event.set()


class _VirtualCondition:
    def __init__(self, clock: VirtualClock, lock: threading.Lock) -> None:
        self.clock = clock
        self.lock = lock
        self.waiters: list[_Ticket] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.clock._wait(self, timeout)
        return True

    def notify_all(self) -> None:
        self.clock._notify(self)


class _SwitchInterval:
    """The process's GIL switch interval while any live cluster runs: the first `start` shortens
    it, the last `stop` puts the value it found back."""

    def __init__(self) -> None:
        self.lock, self.users, self.saved_s = threading.Lock(), 0, 0.0

    def shorten(self) -> None:
        with self.lock:
            if self.users == 0:
                self.saved_s = sys.getswitchinterval()
                sys.setswitchinterval(min(self.saved_s, GIL_SWITCH_INTERVAL_S))
            self.users += 1

    def restore(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                sys.setswitchinterval(self.saved_s)


SWITCH_INTERVAL = _SwitchInterval()
