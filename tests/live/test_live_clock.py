"""The virtual clock: threads run one at a time, in (time, order of issue) like SimPy events."""

from __future__ import annotations

import threading

from dlora.live import VirtualClock


def test_threads_resume_by_time_then_in_order_of_issue():
    clock = VirtualClock()
    log: list[tuple[str, float]] = []
    clock.attach()

    def sleeper(name: str, delays: list[float]):
        def body() -> None:
            for d in delays:
                clock.sleep(d)
                log.append((name, clock.now()))
        return body

    threads = [clock.start_thread(sleeper("a", [1.0, 1.0]), "a"),
               clock.start_thread(sleeper("b", [2.0, 0.5]), "b"),
               clock.start_thread(sleeper("c", [0.5, 1.5]), "c")]
    clock.detach()
    for t in threads:
        t.join(5)
    # at 2.0: b (issued at 0), c (issued at 0.5), a (issued at 1.0) -- as SimPy orders them
    assert log == [("c", 0.5), ("a", 1.0), ("b", 2.0), ("c", 2.0), ("a", 2.0), ("b", 2.5)]


def test_notify_wakes_a_waiter_at_the_current_time_and_a_timeout_fires_otherwise():
    clock = VirtualClock()
    lock = threading.Lock()
    cond = clock.condition(lock)
    seen: list[tuple[str, float]] = []
    clock.attach()

    def waiter() -> None:
        with lock:
            cond.wait()
            seen.append(("woken", clock.now()))
            cond.wait(3.0)
            seen.append(("timeout", clock.now()))

    def notifier() -> None:
        clock.sleep(1.5)
        with lock:
            cond.notify_all()

    threads = [clock.start_thread(waiter, "w"), clock.start_thread(notifier, "n")]
    clock.detach()
    for t in threads:
        t.join(5)
    assert seen == [("woken", 1.5), ("timeout", 4.5)]


def test_a_stall_wakes_the_owner_instead_of_hanging():
    clock = VirtualClock()
    lock = threading.Lock()
    cond = clock.condition(lock)
    clock.attach()
    with lock:
        cond.wait()  # nobody will notify
    assert clock.stalled
    clock.detach()
