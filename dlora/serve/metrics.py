"""`/metrics` in the Prometheus text format.

vLLM's names where the concept is the same (so dashboards and Kubernetes inference gateways
work unchanged). Current vLLM (v1) names, labelled `model_name` and `engine` (one engine per
replica: `engine="0"` is replica 0, as vLLM labels the engines of a data-parallel server):
vllm:num_requests_running / _waiting, vllm:kv_cache_usage_perc (a fraction),
vllm:prefix_cache_queries_total / vllm:prefix_cache_hits_total (prompt tokens looked up in and
found in the prefix cache, from the replicas' scheduler counters),
vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
vllm:request_time_per_output_token_seconds, vllm:e2e_request_latency_seconds,
vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:request_success_total, and
vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}. Inter-token
latency is recorded when a request ends: its decode time split evenly over its token gaps (the
sum and count are exact; each gap is its request's mean). Older names kept as aliases for the
routers and dashboards that still read them, labelled `model_name` only and summed over the
replicas: vllm:gpu_cache_usage_perc, vllm:num_requests_swapped and
vllm:time_per_output_token_seconds (the same observations as inter_token_latency). dlora's own:
dlora_adapter_residency{adapter, replica, state=host|device|merged}, dlora_mode_switches_total,
dlora_credit_forced_batches_total, dlora_migrations_total, dlora_queue_length{replica},
dlora_kv_usage{replica}, dlora_replica_alive{replica}, dlora_requests_aborted_total,
dlora_requests_failed_total (requests that failed alone).
Gauges are read from the scheduler at scrape time (under the live cluster's lock).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..types import Request, RequestStatus

if TYPE_CHECKING:
    from .engine import ServingEngine

disable_created_metrics()  # no *_created series (as vLLM's exposition)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class ServerMetrics:
    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        per_engine = ["model_name", "engine"]
        r = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
                              per_engine, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.",
                             per_engine, buckets=TPOT_BUCKETS, registry=r)
        self.request_tpot = Histogram("vllm:request_time_per_output_token_seconds",
                                      "Mean time per output token of each request in seconds.",
                                      per_engine, buckets=TPOT_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token in seconds "
                              "(older name of vllm:inter_token_latency_seconds).",
                              labels, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             per_engine, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", per_engine, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.",
                                         per_engine, registry=r)
        self.success = Counter("vllm:request_success", "Requests that finished.",
                               [*per_engine, "finished_reason"], registry=r)
        self.aborted = Counter("dlora_requests_aborted", "Requests aborted (client gone) or rejected.",
                               labels, registry=r)
        self.failed = Counter("dlora_requests_failed", "Requests that failed alone (a fault of the "
                              "request: bad input, non-finite logits).", labels, registry=r)
        r.register(_SchedulerCollector(engine))

    def observe_finished(self, request: Request) -> None:
        name = self.engine.model_name
        eng = str(request.replica or 0)
        self.prompt_tokens.labels(name, eng).inc(request.prompt_tokens)
        self.generation_tokens.labels(name, eng).inc(request.generated_tokens)
        if request.status != RequestStatus.FINISHED:
            (self.failed if request.finish_reason == "error" else self.aborted).labels(name).inc()
            return
        self.success.labels(name, eng, request.finish_reason or "length").inc()
        for hist, value in ((self.ttft, request.ttft_s), (self.e2e, request.latency_s),
                            (self.request_tpot, request.tpot_s)):
            if value is not None:
                hist.labels(name, eng).observe(value)
        gap = request.tpot_s
        if gap is not None:
            itl, old = self.itl.labels(name, eng), self.tpot.labels(name)
            for _ in range(max(0, request.generated_tokens - 1)):  # one per token gap
                itl.observe(gap)
                old.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector(Collector):
    """Gauges and totals read from the live cluster at scrape time."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        e = self.engine
        live = e.live
        names = dict(e.adapter_names)
        registered = e.registered_adapters()
        model = e.model_name
        g = {k: GaugeMetricFamily(k, doc, labels=labels) for k, doc, labels in (
            ("vllm:num_requests_running", "Requests on the device.", ["model_name", "engine"]),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", ["model_name", "engine"]),
            ("vllm:kv_cache_usage_perc", "KV-cache usage (1 means 100 percent).", ["model_name", "engine"]),
            ("vllm:num_requests_swapped", "Requests swapped to host memory (older vLLM name).",
             ["model_name"]),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage, all replicas (older name of "
             "vllm:kv_cache_usage_perc).", ["model_name"]),
            ("vllm:lora_requests_info", "Running stats on LoRA requests.",
             ["running_lora_adapters", "waiting_lora_adapters", "max_lora"]),
            ("dlora_adapter_residency", "1 where an adapter is held: host (registered), device "
             "(in a slot), merged (folded into the weights).", ["adapter", "replica", "state"]),
            ("dlora_queue_length", "Unfinished requests on a replica.", ["replica"]),
            ("dlora_kv_usage", "KV-cache usage of a replica (fraction).", ["replica"]),
            ("dlora_replica_alive", "1 while a replica is serving.", ["replica"]),
        )}
        c = {k: CounterMetricFamily(k, doc, labels=labels) for k, doc, labels in (
            ("dlora_mode_switches", "Merged/unmerged switches.", ["replica"]),
            ("dlora_credit_forced_batches", "Batches forced by dLoRA's credits.", ["replica"]),
            ("dlora_migrations", "Requests migrated between replicas.", []),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             ["model_name", "engine"]),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             ["model_name", "engine"]),
        )}
        running = waiting = swapped = used = total = 0
        run_adapters: set[str] = set()
        wait_adapters: set[str] = set()
        with live.lock:  # a consistent snapshot of the schedulers
            for rep in live.cluster.replicas:
                rid = str(rep.id)
                v = rep.view(live.now())
                running, waiting, swapped = running + v.num_running, waiting + v.num_waiting, swapped + v.num_swapped
                used, total = used + v.kv_blocks_used, total + v.kv_blocks_total
                g["vllm:num_requests_running"].add_metric([model, rid], float(v.num_running))
                g["vllm:num_requests_waiting"].add_metric([model, rid], float(v.num_waiting))
                g["vllm:kv_cache_usage_perc"].add_metric(
                    [model, rid], v.kv_blocks_used / v.kv_blocks_total if v.kv_blocks_total else 0.0)
                c["vllm:prefix_cache_queries"].add_metric(
                    [model, rid], float(getattr(rep.stats, "prefix_query_tokens", 0)))
                c["vllm:prefix_cache_hits"].add_metric(
                    [model, rid], float(getattr(rep.stats, "prefix_hit_tokens", 0)))
                for r in rep.unfinished:
                    if r.adapter_id is not None:
                        target = run_adapters if r.status == RequestStatus.RUNNING else wait_adapters
                        target.add(names.get(r.adapter_id, str(r.adapter_id)))
                for name in registered.values():
                    g["dlora_adapter_residency"].add_metric([name, rid, "host"], 1.0)
                for aid in v.resident_adapters:
                    g["dlora_adapter_residency"].add_metric([names.get(aid, str(aid)), rid, "device"], 1.0)
                if v.merged_adapter is not None:
                    g["dlora_adapter_residency"].add_metric([names.get(v.merged_adapter, "?"), rid, "merged"], 1.0)
                g["dlora_queue_length"].add_metric([rid], float(v.num_requests))
                g["dlora_kv_usage"].add_metric([rid], v.kv_usage)
                g["dlora_replica_alive"].add_metric([rid], float(rep.is_alive))
                c["dlora_mode_switches"].add_metric([rid], float(rep.stats.switches))
                c["dlora_credit_forced_batches"].add_metric([rid], float(rep.stats.credit_forced_batches))
            c["dlora_migrations"].add_metric([], float(live.cluster.num_migrations))
        g["vllm:num_requests_swapped"].add_metric([model], float(swapped))
        g["vllm:gpu_cache_usage_perc"].add_metric([model], used / total if total else 0.0)
        g["vllm:lora_requests_info"].add_metric(
            [",".join(sorted(run_adapters)), ",".join(sorted(wait_adapters)), str(e.cfg.max_loras or 0)],
            time.time())
        yield from g.values()
        yield from c.values()
