"""`/metrics` names as current vLLM exports them (with the `engine` label) and the older
names kept as aliases, scraped from a running server; `--max-cpu-loras` as vLLM's LRU host cache
(more adapters than it loaded and served; a missing path reports the path, not the cap)."""

from __future__ import annotations

import re

import httpx
import pytest

from dlora.errors import ConfigError
from dlora.exec.demo import demo_adapter_paths, ensure_demo
from dlora.serve import BackgroundServer, ServeConfig, ServingEngine

ADAPTERS = ["alpha-r4", "beta-r8", "gamma-r8", "delta-r16"]
BODY = {"prompt": [1, 5, 9, 13], "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    # one device slot and one host copy per replica: every adapter switch re-reads a folder
    cfg = ServeConfig(replicas=2, max_loras=1, max_cpu_loras=1, allow_runtime_lora=True)
    engine = ServingEngine(cfg)
    with BackgroundServer(engine) as srv:
        yield srv


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` (exactly that name)."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def test_current_vllm_names_with_engine_label_and_old_aliases(server):
    for k, model in enumerate(["dlora-demo", *ADAPTERS, *ADAPTERS]):  # more adapters than host copies
        r = httpx.post(server.url + "/v1/completions", json={**BODY, "model": model}, timeout=60)
        assert r.status_code == 200, (k, r.text)
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:inter_token_latency_seconds_count", "vllm:time_to_first_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_time_per_output_token_seconds_count",
                 "vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        samples = _samples(text, name)
        assert samples, name
        assert all(s[0].get("engine") in ("0", "1") and s[0].get("model_name") == "dlora-demo"
                   for s in samples), (name, samples)
    assert {s[0]["engine"] for s in _samples(text, "vllm:kv_cache_usage_perc")} == {"0", "1"}
    for name in ("vllm:gpu_cache_usage_perc", "vllm:num_requests_swapped",
                 "vllm:time_per_output_token_seconds_count"):  # older names: model_name only
        samples = _samples(text, name)
        assert samples and all(s[0] == {"model_name": "dlora-demo"} for s in samples), (name, samples)
    itl = sum(v for _, v in _samples(text, "vllm:inter_token_latency_seconds_count"))
    assert itl == sum(v for _, v in _samples(text, "vllm:time_per_output_token_seconds_count")) == 9 * 3
    assert sum(v for _, v in _samples(text, "vllm:generation_tokens_total")) == 9 * 4
    # executors do not share KV blocks yet: the counters exist and stay 0 (hits <= queries)
    hits = sum(v for _, v in _samples(text, "vllm:prefix_cache_hits_total"))
    assert 0 <= hits <= sum(v for _, v in _samples(text, "vllm:prefix_cache_queries_total"))
    for ex in server.engine.executors:  # the LRU host cache held at most one copy
        assert len(ex.inner.store.cached) <= 1


def test_max_cpu_loras_is_a_cache_not_a_cap(server, tmp_path):
    url = server.url + "/v1/"
    alpha = str(demo_adapter_paths(ensure_demo())[0])
    r = httpx.post(url + "load_lora_adapter", json={"lora_name": "ghost", "lora_path": str(tmp_path / "none")})
    assert r.status_code == 400 and "does not exist" in r.text and "max-cpu-loras" not in r.text
    for name in ("alpha-2", "alpha-3"):  # registered adapters beyond --max-cpu-loras
        r = httpx.post(url + "load_lora_adapter", json={"lora_name": name, "lora_path": alpha})
        assert r.status_code == 200, r.text
    outs = [httpx.post(url + "completions", json={**BODY, "model": m}, timeout=60).json()["choices"][0]["text"]
            for m in ("alpha-r4", "alpha-2", "beta-r8", "alpha-3")]
    assert outs[0] == outs[1] == outs[3]  # the same weights, read again after eviction


def test_max_cpu_loras_below_max_loras_is_refused():
    with pytest.raises(ConfigError, match="--max-cpu-loras"):
        ServeConfig(max_loras=4, max_cpu_loras=2)
