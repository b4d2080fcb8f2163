"""`dlora serve` against real clients: a server on 127.0.0.1 (background thread, demo model,
2 replicas) and the `openai` package; adapter load/unload, every error, disconnects,
concurrency, metrics; and the `dlora serve` command itself in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
from serve_helpers import wait_healthy
from serve_helpers import wait_until as _wait_until

from dlora.exec.demo import ensure_demo
from dlora.serve import BackgroundServer, ServeConfig, ServingEngine

DEMO = "dlora-demo"
ADAPTERS = ["alpha-r4", "beta-r8", "gamma-r8", "delta-r16"]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def server():
    engine = ServingEngine(ServeConfig(replicas=2, max_loras=2, max_cpu_loras=8, allow_runtime_lora=True))
    engine.codec.chat_template = CHAT_TEMPLATE  # the demo model has none
    with BackgroundServer(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def wait_until(cond, timeout_s: float = 20.0) -> bool:
    return _wait_until(cond, timeout_s)


def kv_blocks_used(engine: ServingEngine) -> int:
    return sum(r.memory.kv_used_blocks for r in engine.live.cluster.replicas)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_models_lists_the_base_model_and_each_adapter_with_its_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {DEMO, *ADAPTERS}
    assert cards[DEMO].parent is None
    assert all(cards[a].parent == DEMO for a in ADAPTERS)


def test_completion_for_every_adapter_and_the_base_model(client):
    texts = {}
    for model in [DEMO, *ADAPTERS]:
        r = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=6, **GREEDY)
        assert r.model == model
        assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens > 0
        texts[model] = r.choices[0].text
    again = client.completions.create(model="beta-r8", prompt="The quick brown fox", max_tokens=6, **GREEDY)
    assert again.choices[0].text == texts["beta-r8"]  # greedy is deterministic
    assert any(texts[a] != texts[DEMO] for a in ADAPTERS)  # adapters change the output


def test_streamed_completion_and_chat_match_the_non_streamed_text(client):
    whole = client.completions.create(model="gamma-r8", prompt="Hello", max_tokens=8, **GREEDY)
    chunks = list(client.completions.create(model="gamma-r8", prompt="Hello", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is dlora?"}]
    chat = client.chat.completions.create(model="delta-r16", messages=msgs, max_tokens=7, **GREEDY)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 7
    stream = list(client.chat.completions.create(model="delta-r16", messages=msgs, max_tokens=7,
                                                 stream=True, **GREEDY))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
            "model": "alpha-r4", "prompt": "x", "max_tokens": 3, "stream": True, "ignore_eos": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "no-such-adapter", "prompt": "x"}, 404, "model"),
    ({"model": DEMO, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": DEMO, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": DEMO, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": DEMO, "prompt": "x", "no_such_field": 1}, 400, "no_such_field"),
    ({"model": DEMO, "prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": DEMO, "prompt": "x", "logit_bias": {"512": 5}}, 400, "logit_bias"),
    ({"model": DEMO, "prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),
    ({"model": DEMO, "prompt": list(range(3, 1103))}, 400, "max_tokens"),  # longer than the context
    ({"model": DEMO}, 400, "prompt"),  # missing field
])
def test_errors_have_openai_shape(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_openai_client_raises_the_matching_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=DEMO, prompt="x", max_tokens=5000)


@contextmanager
def paused(engine: ServingEngine):
    """Hold every replica's next step until the block ends (an adapter-change op that waits)."""
    gate = threading.Event()
    for ex in engine.executors:
        ex.enqueue(lambda _: gate.wait(30))
    try:
        yield gate
    finally:
        gate.set()


def aborts_requested(engine: ServingEngine) -> bool:
    """Every request's client is gone: aborted already, or waiting for its step to end."""
    return all(g.ended for g in list(engine._streams.values()))


def test_overload_gives_429_and_a_disconnect_frees_kv(server, client):
    engine = server.engine
    aborted0 = metric(httpx.get(server.url + "/metrics").text, "dlora_requests_aborted_total")
    engine.max_queue = 1
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
                "model": "beta-r8", "prompt": "long", "max_tokens": 900, "stream": True,
                "ignore_eos": True}) as stream:
            with paused(engine):
                assert wait_until(lambda: engine.num_unfinished == 1)
                r = httpx.post(server.url + "/v1/completions", json={"model": DEMO, "prompt": "x"}, timeout=30)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == 429
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=DEMO, prompt="x", max_tokens=2)
            lines = stream.iter_lines()
            next(lines)  # running and streaming
            with paused(engine) as gate:
                assert wait_until(lambda: kv_blocks_used(engine) > 0)
                stream.close()  # the client goes away mid-stream
                assert wait_until(lambda: aborts_requested(engine))
                gate.set()
        # the request was aborted in the scheduler and its blocks freed
        assert wait_until(lambda: engine.num_unfinished == 0 and kv_blocks_used(engine) == 0)
    finally:
        engine.max_queue = engine.cfg.max_queue
    aborted = metric(httpx.get(server.url + "/metrics").text, "dlora_requests_aborted_total")
    assert aborted == aborted0 + 1


def test_non_streamed_request_is_aborted_when_the_client_times_out(server):
    engine = server.engine
    aborted0 = metric(httpx.get(server.url + "/metrics").text, "dlora_requests_aborted_total")
    with paused(engine) as gate:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", timeout=0.3, json={
                "model": "gamma-r8", "prompt": "long", "max_tokens": 900, "ignore_eos": True})
        assert wait_until(lambda: aborts_requested(engine))
        gate.set()
    assert wait_until(lambda: engine.num_unfinished == 0 and kv_blocks_used(engine) == 0)
    aborted = metric(httpx.get(server.url + "/metrics").text, "dlora_requests_aborted_total")
    assert aborted == aborted0 + 1


def test_load_and_unload_adapters(server, client, tmp_path):
    engine = server.engine
    alpha = engine.adapters["alpha-r4"].path
    url = server.url + "/v1/"
    r = httpx.post(url + "load_lora_adapter", json={"lora_name": "alpha-copy", "lora_path": alpha})
    assert r.status_code == 200, r.text
    assert "alpha-copy" in {m.id for m in client.models.list().data}
    ref = client.completions.create(model="alpha-r4", prompt="Hi", max_tokens=5, **GREEDY)
    copy = client.completions.create(model="alpha-copy", prompt="Hi", max_tokens=5, **GREEDY)
    assert copy.choices[0].text == ref.choices[0].text  # the same weights under a new name

    # bad adapters: 400 with the AdapterError text, and the server keeps serving
    r = httpx.post(url + "load_lora_adapter", json={"lora_name": "ghost", "lora_path": str(tmp_path / "none")})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    broken = tmp_path / "broken"
    shutil.copytree(alpha, broken)
    (broken / "adapter_config.json").write_text("{not json")
    r = httpx.post(url + "load_lora_adapter", json={"lora_name": "broken", "lora_path": str(broken)})
    assert r.status_code == 400 and "broken" in r.json()["error"]["message"]
    r = httpx.post(url + "load_lora_adapter", json={"lora_name": "alpha-copy", "lora_path": alpha})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    assert client.completions.create(model="alpha-r4", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1

    # unload while a request of it runs: it finishes; new requests get 404
    aid = engine.adapters["alpha-copy"].id
    with httpx.stream("POST", url + "completions", timeout=30, json={
            "model": "alpha-copy", "prompt": "Hi", "max_tokens": 40, "stream": True, "ignore_eos": True}) as s:
        lines = s.iter_lines()
        next(lines)
        r = httpx.post(url + "unload_lora_adapter", json={"lora_name": "alpha-copy"})
        assert r.status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="alpha-copy", prompt="Hi", max_tokens=2)
        rest = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    assert engine.outstanding(aid) == 0
    assert "alpha-copy" not in {m.id for m in client.models.list().data}
    r = httpx.post(url + "unload_lora_adapter", json={"lora_name": "alpha-copy"})
    assert r.status_code == 404


def test_concurrent_clients_over_mixed_adapters(client):
    models = [DEMO, *ADAPTERS]

    def one(i: int) -> int:
        model = models[i % len(models)]
        if i % 3 == 0:
            chunks = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=5, stream=True,
                stream_options={"include_usage": True}, **GREEDY)
            return [c for c in chunks][-1].usage.completion_tokens
        return client.completions.create(model=model, prompt=f"prompt {i}", max_tokens=5,
                                         **GREEDY).usage.completion_tokens

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, range(24))) == [5] * 24


def test_metrics_has_vllm_and_dlora_names(server, client):
    client.completions.create(model="beta-r8", prompt="m", max_tokens=3, **GREEDY)
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:lora_requests_info{", 'max_lora="2"',
                 'dlora_adapter_residency{adapter="beta-r8",replica="0",state="host"}',
                 "dlora_mode_switches_total", "dlora_credit_forced_batches_total",
                 "dlora_migrations_total", 'dlora_queue_length{replica="1"}', 'dlora_kv_usage{replica="0"}'):
        assert name in text, name
    assert metric(text, "vllm:generation_tokens_total") >= 3
    assert 'state="device"' in text  # beta-r8 sits in a slot of the replica that ran it
    assert httpx.get(server.url + "/health").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dlora_serve_command(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlora.cli", "serve", "--port", str(port), "--log-level", "warning",
         "--lora-modules", f"mine={ensure_demo() / 'adapters' / 'gamma-r8'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_healthy(url, proc)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == [DEMO, "mine"]
        assert c.completions.create(model="mine", prompt="x", max_tokens=3, **GREEDY).usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_stop_strings_cut_the_text_and_end_the_request(client):
    whole = client.completions.create(model="delta-r16", prompt="Stop here", max_tokens=12, **GREEDY)
    text = whole.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.completions.create(model="delta-r16", prompt="Stop here", max_tokens=12, stop=[stop], **GREEDY)
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="delta-r16", prompt="Stop here", max_tokens=12, stop=stop,
                                         stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.find(stop)]


def test_lora_modules_parsing():
    from dlora.errors import ConfigError
    from dlora.serve import parse_lora_modules

    assert parse_lora_modules(["a=/x", '{"name": "b", "path": "/y"}']) == (("a", "/x"), ("b", "/y"))
    with pytest.raises(ConfigError, match="name=path"):
        parse_lora_modules(["nopath"])
    with pytest.raises(ConfigError, match="unique"):
        ServeConfig(lora_modules=(("a", "/x"), ("a", "/y")))
