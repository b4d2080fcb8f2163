"""A fault of one request fails that request alone (issue 15, defect 1): prompt ids outside the
vocabulary are a 400 (and, past the API, the executor fails that request alone); an adapter with
huge finite weights fails its own requests with a 500 and is disabled; a step that raises is
re-run request by request and only the one that raises fails; a replica that really fails is
marked dead and rebuilt; with no live replica the answer is 503. After each, /health is 200 and
the next request is served."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch
from serve_helpers import huge_adapter, raw_request, wait_until

from dlora.exec import TorchExecutor
from dlora.exec.demo import VOCAB, demo_adapter_paths, ensure_demo
from dlora.serve import BackgroundServer, ServeConfig, ServingEngine
from dlora.types import Batch, BatchItem, BatchMode, Request, RequestStatus, SamplingParams

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


# ---- the executor: faults of one request in a batch ----

def _req(rid: int, prompt: list[int], adapter: int | None) -> Request:
    return Request(rid, adapter, 0.0, len(prompt), 4, prompt_token_ids=tuple(prompt),
                   sampling=SamplingParams(temperature=0.0))


def _prefill(ex: TorchExecutor, reqs: list[Request], step: int = 0):
    items = tuple(BatchItem(r.id, r.adapter_id, 0, r.prompt_tokens, True) for r in reqs)
    res = ex.execute(Batch(0, step, BatchMode.UNMERGED, None, items, tuple(reqs)))
    for r in reqs:
        ex.free_request(r.id)
    return res


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    torch.set_num_threads(1)
    folder = ensure_demo()
    huge = huge_adapter(tmp_path_factory.mktemp("faults") / "huge")
    return TorchExecutor(folder, {0: demo_adapter_paths(folder)[0], 1: huge})


def test_bad_ids_and_non_finite_rows_fail_alone_and_the_rest_is_sampled(executor):
    good = [1, 44, 45, 46]
    alone = _prefill(executor, [_req(0, good, 0)])
    res = _prefill(executor, [_req(1, [1, VOCAB], None), _req(2, good, 0), _req(3, [1, -1], 0),
                              _req(4, good, 1)])
    assert res.error is None
    faults = {f.request_id: f for f in res.faults}
    assert set(faults) == {1, 3, 4}
    assert "outside the vocabulary [0, 512)" in faults[1].message and faults[1].adapter_id is None
    assert "-1" in faults[3].message and faults[3].adapter_id is None  # the input, not the adapter
    assert "not finite" in faults[4].message and faults[4].adapter_id == 1  # the adapter is blamed
    assert len(res.token_ids) == 4 and res.token_ids[1] == alone.token_ids[0]  # the good one as alone
    assert executor.kv.free_blocks == executor.kv.num_blocks
    # the blocks the huge adapter's request filled with NaN are reused, zeroed, by the next ones
    reused = _prefill(executor, [_req(9, good * 4, 1)])
    assert reused.faults and not torch.isfinite(executor.kv.pool).all()
    after = _prefill(executor, [_req(10, good, 0), _req(11, good * 3, None)])
    assert after.faults == () and after.token_ids[0] == alone.token_ids[0]


def test_an_adapter_the_executor_cannot_serve_fails_its_requests_alone(executor):
    good = [1, 44, 45, 46]
    alone = _prefill(executor, [_req(20, good, None)])
    res = _prefill(executor, [_req(21, good, 9), _req(22, good, None)])  # adapter 9: not registered
    assert res.error is None and res.token_ids[1] == alone.token_ids[0]
    assert [(f.request_id, f.adapter_id) for f in res.faults] == [(21, 9)]
    assert "not registered" in res.faults[0].message
    items = (BatchItem(23, 9, 0, len(good), True),)
    merged = executor.execute(Batch(0, 1, BatchMode.MERGED, 9, items, (_req(23, good, 9),), merge_adapter=9))
    assert merged.error is None and [f.request_id for f in merged.faults] == [23]
    assert executor.merged_adapter is None


def test_a_raising_step_is_rerun_per_request_and_only_the_raising_one_fails(executor, monkeypatch):
    forward = executor.model.forward
    poison = 77

    def fragile(step, pool, lora=None):
        if poison in step.token_ids.tolist():
            raise IndexError("index out of range in self")
        return forward(step, pool, lora)

    monkeypatch.setattr(executor.model, "forward", fragile)
    good = [1, 44, 45, 46]
    res = _prefill(executor, [_req(5, good, None), _req(6, [1, poison], None)])
    assert res.error is None
    assert [(f.request_id, f.message) for f in res.faults] == [(6, "IndexError: index out of range in self")]
    assert res.token_ids[0] == _prefill(executor, [_req(7, good, None)]).token_ids[0]

    def dead(step, pool, lora=None):  # the device is gone: the probe fails too
        raise RuntimeError("CUDA error: device lost")

    monkeypatch.setattr(executor.model, "forward", dead)
    with pytest.raises(RuntimeError, match="device lost"):
        _prefill(executor, [_req(8, good, None)])
    assert not executor.probe()


# ---- the server ----

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = ServingEngine(ServeConfig(replicas=2, max_loras=2, allow_runtime_lora=True))
    with BackgroundServer(engine) as srv:
        srv.huge = huge_adapter(tmp_path_factory.mktemp("server-faults") / "huge")
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def still_serving(server, client) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert all(r.is_alive for r in server.engine.live.cluster.replicas)
    r = client.completions.create(model="alpha-r4", prompt="after", max_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("prompt", [[VOCAB], [1, VOCAB + 1000], [-1], [1, 2, -512]])
def test_prompt_ids_outside_the_vocabulary_are_a_400(server, client, prompt):
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": "alpha-r4", "prompt": prompt, "max_tokens": 3})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == "prompt"
    assert "outside the model's vocabulary [0, 512)" in err["message"]
    still_serving(server, client)


def test_a_poison_request_past_the_api_fails_alone(server, client):
    engine = server.engine
    failed0 = engine.live.stats.failed_requests
    bad = raw_request(engine.live, (1, VOCAB))
    assert engine.live.submit(bad)
    assert wait_until(lambda: bad.is_done)
    assert bad.status == RequestStatus.ABORTED and bad.finish_reason == "error"
    assert "outside the vocabulary" in bad.error
    assert engine.live.stats.failed_requests == failed0 + 1
    assert engine.live.stats.failed_steps == 0 and engine.live.stats.dead_replicas == []
    assert "dlora_requests_failed_total" in httpx.get(server.url + "/metrics").text
    still_serving(server, client)


def test_a_huge_weight_adapter_fails_its_request_alone_and_is_disabled(server, client):
    engine = server.engine
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "huge", "lora_path": str(server.huge)})
    assert r.status_code == 200, r.text  # finite weights: it loads

    results: dict[str, httpx.Response] = {}
    gate = threading.Event()
    for ex in engine.executors:  # hold the steps so both requests are queued together
        ex.enqueue(lambda _: gate.wait(30))

    def post(name: str, model: str) -> None:
        results[name] = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": "Hello there", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True})

    threads = [threading.Thread(target=post, args=(n, m)) for n, m in (("bad", "huge"), ("good", "beta-r8"))]
    for t in threads:
        t.start()
    assert wait_until(lambda: engine.num_unfinished == 2)
    gate.set()
    for t in threads:
        t.join(60)
    assert results["good"].status_code == 200 and results["good"].json()["usage"]["completion_tokens"] == 4
    bad = results["bad"]
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["code"] == 500 and "not finite" in err["message"] and "`huge`" in err["message"]

    # the adapter is disabled: a clear 400, not another 500
    again = httpx.post(server.url + "/v1/completions", timeout=30, json={"model": "huge", "prompt": "x"})
    assert again.status_code == 400 and "disabled" in again.json()["error"]["message"]
    assert engine.live.stats.failed_steps == 0 and engine.live.stats.dead_replicas == []
    still_serving(server, client)

    # streamed: an error event, then [DONE]; unloading and loading it again clears the flag
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "huge"}).status_code == 200
    assert httpx.post(server.url + "/v1/load_lora_adapter",
                      json={"lora_name": "huge", "lora_path": str(server.huge)}).status_code == 200
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "huge", "prompt": "x", "max_tokens": 3, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == 500
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "huge"}).status_code == 200
    still_serving(server, client)


def test_a_failing_replica_is_marked_dead_rebuilt_and_revived(server, client):
    engine = server.engine
    ex = engine.executors[0]
    old = ex.inner

    def lost(batch):
        raise RuntimeError("device lost")

    old.execute = lost  # the replica's device fails every step; the new executor will not
    outs = []

    def one(i: int) -> None:
        outs.append(client.completions.create(model="gamma-r8", prompt=f"r{i}", max_tokens=5, **GREEDY))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [o.usage.completion_tokens for o in outs] == [5] * 4  # moved to replica 1 and completed
    assert 0 in engine.live.stats.dead_replicas
    assert wait_until(lambda: engine.live.cluster.replicas[0].is_alive and engine.live.stats.restarts >= 1)
    assert ex.inner is not old
    still_serving(server, client)


def test_no_live_replica_is_a_503(server, client):
    engine = server.engine
    reps = engine.live.cluster.replicas
    with engine.live.lock:  # idle replicas, marked dead for a moment (their workers sleep)
        for rep in reps:
            rep.is_alive = False
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=30, json={"model": "alpha-r4", "prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "no live replica" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        # a worker that woke (or was between steps) while its replica read dead has ended, a
        # sleeping one ends when woken: wake them all and give each replica a new worker
        with engine.live.lock:
            for wake in engine.live.wakes:
                wake.notify_all()
        for rep in reps:
            engine.live.revive(rep.id)
    still_serving(server, client)
