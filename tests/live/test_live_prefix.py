"""Prefix caching in a live run on the demo model: with `workload.prefix` the requests of an
adapter share its system prompt's token ids, the executors share those KV blocks, the report's
hit rate is positive, and every request generates exactly the tokens it generates with
`cluster.prefix_caching=false`."""

from __future__ import annotations

import pytest
from live_helpers import LIVE_DEMO, scenario

from dlora.live import build_live_report, run

SETS = ("workload.num_requests=10", "workload.arrival.rate_per_s=40", "cluster.replicas=1",
        "workload.lengths.prompt_range=[40,72]", "workload.lengths.output_range=[2,5]",
        "workload.prefix={kind: per_adapter, tokens: 36}", "cluster.block_size=8")


@pytest.mark.usefixtures("demo_home")
def test_a_live_run_shares_prompt_blocks_and_generates_the_same_tokens():
    results = {}
    for caching in (True, False):
        sc = scenario(*SETS, f"cluster.prefix_caching={'true' if caching else 'false'}", path=LIVE_DEMO)
        results[caching] = run(sc, device="cpu")
    on, off = results[True], results[False]
    assert [r.output_token_ids for r in on.requests] == [r.output_token_ids for r in off.requests]
    assert all(r.generated_tokens == r.output_tokens for r in on.requests)
    hit_rate = build_live_report(on).summary["prefix_cache_hit_rate"]
    assert hit_rate > 0 and build_live_report(off).summary["prefix_cache_hit_rate"] == 0
    stats = on.cluster.replicas[0].stats
    assert stats.prefix_hit_tokens > 0 and stats.prefix_query_tokens > stats.prefix_hit_tokens


@pytest.mark.usefixtures("demo_home")
def test_the_server_shares_a_system_prompt_and_its_flag_turns_that_off():
    import asyncio

    from dlora.serve import ServeConfig, ServingEngine
    from dlora.serve.engine import GenerationParams

    system = [3 + (7 * j) % 500 for j in range(40)]
    prompts = [("alpha-r4", system + [9, 10]), ("alpha-r4", system + [11]), ("beta-r8", system + [9, 10]),
               ("dlora-demo", system + [12, 13, 14])]

    async def serve_all(engine: ServingEngine) -> list[list[int]]:
        out = []
        for model, ids in prompts:  # one after another: each finds what the earlier ones left
            gen = engine.submit(model, ids, GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            out.append([t async for t in gen])
        return out

    outputs, hits = {}, {}
    for caching in (True, False):
        engine = ServingEngine(ServeConfig(replicas=1), enable_prefix_caching=caching)
        engine.start()
        try:
            outputs[caching] = asyncio.run(serve_all(engine))
        finally:
            engine.stop()
        hits[caching] = engine.live.cluster.replicas[0].stats.prefix_hit_tokens
    assert outputs[True] == outputs[False]
    assert hits[True] == 32 and hits[False] == 0  # only alpha-r4's second request: 2 blocks of 16
