"""The hooks a server drives: submit from any thread, tokens streamed in order through
on_token, on_finish exactly once, abort (also from inside a callback), stop."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
from live_helpers import SleepingExecutor, scenario, tokens_script

from dlora.errors import DloraError
from dlora.live import create_live_cluster
from dlora.types import Request, RequestStatus


def request(live, adapter: int | None, output: int) -> Request:
    return Request(live.next_request_id(), adapter, 0.0, prompt_tokens=5, output_tokens=output,
                   prompt_token_ids=(3, 4, 5, 6, 7))


def test_submitted_requests_stream_their_tokens_in_order_and_finish_once():
    tokens: dict[int, list[int]] = defaultdict(list)
    finished: list[int] = []
    system = create_live_cluster(
        scenario("cluster.replicas=2"), lambda i: SleepingExecutor(script=tokens_script(0.002)),
        on_token=lambda r, t: tokens[r.id].append(t), on_finish=lambda r: finished.append(r.id))
    live = system.live
    live.start()
    reqs = [request(live, i % 3 if i else None, 3 + i) for i in range(6)]
    threads = [threading.Thread(target=live.submit, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert live.wait(30)
    live.stop()
    assert len({r.id for r in reqs}) == 6
    for r in reqs:
        assert r.status == RequestStatus.FINISHED and r.finish_reason == "length"
        assert tokens[r.id] == r.output_token_ids and len(r.output_token_ids) == r.output_tokens
        assert r.arrival_s >= 0.0 and r.first_token_s >= r.arrival_s
    assert sorted(finished) == sorted(r.id for r in reqs)
    with pytest.raises(DloraError, match="not running"):
        live.submit(request(live, 0, 2))


def test_abort_from_a_token_callback_frees_the_request_and_finishes_it_once():
    finished: list[Request] = []
    holder: dict = {}

    def on_token(r: Request, token: int) -> None:
        if r.id == holder["long"] and len(r.output_token_ids) == 3:
            assert holder["live"].abort(r.id)

    system = create_live_cluster(
        scenario("cluster.replicas=1"), lambda i: SleepingExecutor(script=tokens_script(0.002)),
        on_token=on_token, on_finish=finished.append)
    live = holder["live"] = system.live
    live.start()
    long, short = request(live, 1, 2000), request(live, 2, 6)
    holder["long"] = long.id
    live.submit(long)
    live.submit(short)
    assert live.wait(30)
    live.stop()
    assert long.status == RequestStatus.ABORTED and long.finish_reason == "abort"
    assert 3 <= long.generated_tokens < 10
    assert short.status == RequestStatus.FINISHED
    assert [r.id for r in finished].count(long.id) == 1 and len(finished) == 2
    rep = live.cluster.replicas[0]
    assert rep.memory.kv_used_blocks == 0 and not rep.unfinished
    assert not live.abort(long.id)  # already done
    assert live.stats.aborted == 1


def test_start_shortens_the_gil_switch_interval_and_the_last_stop_puts_it_back():
    import sys

    from dlora.live.clock import GIL_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        make = lambda: create_live_cluster(  # noqa: E731
            scenario("cluster.replicas=1"), lambda i: SleepingExecutor(script=tokens_script(0.001))).live
        first, second = make(), make()
        first.start()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        second.start()
        first.stop()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)  # second still runs
        second.stop()
        second.stop()  # idempotent: restores once
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(before)
