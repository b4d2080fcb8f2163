"""The Ray backend on a local Ray cluster: replicas are actors; a fault of one request (bad
token ids, an adapter with huge weights) fails that request alone inside its actor; killing an
actor mid-run loses no request (its requests are recomputed on the live replica) and the
replica comes back. Skipped only where Ray is not installed or cannot start here."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import huge_adapter, raw_request
from serve_helpers import wait_until as _wait_until

from dlora.serve import BackgroundServer, ServeConfig, ServingEngine

ray = pytest.importorskip("ray", reason="the ray package is not installed")
pytestmark = pytest.mark.slow
MODELS = ["dlora-demo", "alpha-r4", "beta-r8", "gamma-r8", "delta-r16"]


def wait_until(cond, timeout_s: float = 120.0) -> bool:
    return _wait_until(cond, timeout_s, poll_s=0.05)


@pytest.fixture(scope="module")
def ray_server():
    try:
        engine = ServingEngine(ServeConfig(replicas=2, ray_address="local", allow_runtime_lora=True))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Ray cannot start here: {exc}")
    try:
        with BackgroundServer(engine) as srv:
            yield srv
    finally:
        ray.shutdown()


def test_a_request_fault_fails_that_request_alone_on_ray(ray_server, tmp_path):
    engine = ray_server.engine
    client = openai.OpenAI(base_url=ray_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = httpx.post(ray_server.url + "/v1/completions", timeout=60,
                   json={"model": "alpha-r4", "prompt": [512], "max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    bad = raw_request(engine.live, (1, 512))  # past the API: the actor's executor fails it alone
    assert engine.live.submit(bad)
    assert wait_until(lambda: bad.is_done, 60)
    assert bad.finish_reason == "error" and "outside the vocabulary" in bad.error
    huge = huge_adapter(tmp_path / "huge")
    assert httpx.post(ray_server.url + "/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "huge", "lora_path": str(huge)}).status_code == 200
    r = httpx.post(ray_server.url + "/v1/completions", timeout=60, json={"model": "huge", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 500 and "not finite" in r.json()["error"]["message"]
    assert httpx.post(ray_server.url + "/v1/unload_lora_adapter", json={"lora_name": "huge"}).status_code == 200
    assert httpx.get(ray_server.url + "/health").status_code == 200
    assert all(rep.is_alive for rep in engine.live.cluster.replicas)
    assert engine.live.stats.failed_steps == 0 and [ex.inner.restarts for ex in engine.executors] == [0, 0]
    assert client.completions.create(model="beta-r8", prompt="next", max_tokens=3).usage.completion_tokens == 3

    # a fault of the replica whose actor stays alive: the replica is marked dead, its actor
    # replaced, and the replica rejoins (before, nothing revived it)
    proxy = engine.executors[1].inner
    old_actor, failed = proxy.actor, []

    def fails_once(batch):
        if not failed:
            failed.append(batch.step)
            raise RuntimeError("kernel launch failed")
        return type(proxy).execute(proxy, batch)

    proxy.execute = fails_once
    gate = threading.Event()
    engine.executors[1].enqueue(lambda _: gate.wait(60))  # hold replica 1's next step
    try:
        with ThreadPoolExecutor(1) as pool:
            with engine.live.lock:  # replica 0 out of the dispatcher's sight for a moment
                engine.live.cluster.replicas[0].is_alive = False
            try:
                future = pool.submit(client.completions.create, model="gamma-r8", prompt="x", max_tokens=3)
                assert wait_until(lambda: len(engine.live.cluster.replicas[1].unfinished) == 1, 30)
            finally:
                with engine.live.lock:
                    engine.live.cluster.replicas[0].is_alive = True
                gate.set()
            r = future.result(timeout=120)
        assert r.usage.completion_tokens == 3 and failed  # moved to replica 0 and completed
        assert wait_until(lambda: proxy.restarts == 1 and engine.live.cluster.replicas[1].is_alive)
        assert proxy.actor is not old_actor
    finally:
        del proxy.execute
    assert client.completions.create(model="beta-r8", prompt="again", max_tokens=3).usage.completion_tokens == 3


def test_killed_replica_actor_loses_no_request_and_comes_back(ray_server):
    engine = ray_server.engine
    client = openai.OpenAI(base_url=ray_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert client.completions.create(model="beta-r8", prompt="warm", max_tokens=2).usage.completion_tokens >= 1
    victim = engine.executors[0].inner
    old_actor = victim.actor
    gate = threading.Event()
    for ex in engine.executors:  # hold both replicas' next step so the kill lands mid-run
        ex.enqueue(lambda _: gate.wait(60))

    def one(i: int) -> tuple[int, str]:
        r = client.completions.create(model=MODELS[i % len(MODELS)], prompt=f"request {i}", max_tokens=12,
                                      temperature=0.0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(8)]
        assert wait_until(lambda: engine.num_unfinished == 8, 30)
        on_victim = len(engine.live.cluster.replicas[0].unfinished)
        assert on_victim > 0  # least_loaded spread them over both replicas
        ray.kill(old_actor, no_restart=True)
        gate.set()
        results = [f.result(timeout=120) for f in futures]
    assert results == [(12, "length")] * 8  # every request completed, none lost
    assert engine.live.stats.moved_from_dead >= on_victim
    # the replica's actor was restarted and the replica rejoined the cluster
    assert wait_until(lambda: victim.restarts == 1 and engine.live.cluster.replicas[0].is_alive)
    assert victim.actor is not old_actor
    text = httpx.get(ray_server.url + "/metrics").text
    assert 'dlora_replica_alive{replica="0"} 1.0' in text
    # and it serves again: fill both replicas
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == [(12, "length")] * 4
    assert engine.live.cluster.replicas[0].stats.finished > 0



def test_sampling_fields_and_logprobs_cross_the_actor_boundary(ray_server):
    """Penalties, logit_bias and n reach the actors' executors in `Request.sampling`, and the
    log-probabilities come back in `StepResult.logprobs`."""
    body = {"model": "dlora-demo", "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "logprobs": 2, "n": 2, "logit_bias": {"77": 100}}
    r = httpx.post(ray_server.url + "/v1/completions", timeout=120, json=body)
    assert r.status_code == 200, r.text
    token = ray_server.engine.codec.decode([77], skip_special_tokens=False)
    for choice in r.json()["choices"]:
        lp = choice["logprobs"]
        assert lp["tokens"] == [token] * 4 and len(lp["token_logprobs"]) == 4
        assert all(len(top) >= 2 for top in lp["top_logprobs"])
