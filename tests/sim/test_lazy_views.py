"""A view of a replica in a fast-path jump applies nothing (`Cluster.view_of` counts what the
unapplied iterations add): it must equal the view of the same replica brought up to date,
also when its KV fields (computed on first read) are read after the replica changed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dlora.core.cluster import Cluster
from dlora.scenario import load_scenario
from dlora.sim.driver import simulate

QUICKSTART = Path(__file__).resolve().parents[2] / "scenarios" / "quickstart.yaml"


@pytest.mark.parametrize("sets", [
    [],
    ["cluster.memory_fraction=0.004", "cluster.prefix_caching=true",
     "workload.prefix={kind: per_adapter, tokens: 48}"],
    ["policies.batching=unmerged_only", "policies.dispatch=least_loaded"],
])
def test_a_lazy_view_equals_the_view_brought_up_to_date(monkeypatch, sets) -> None:  # type: ignore[no-untyped-def]
    lazy_view_of = Cluster.view_of
    compared = {"n": 0, "pending": 0}

    def checked(self: Cluster, replica: int, now: float):  # type: ignore[no-untyped-def]
        lazy = lazy_view_of(self, replica, now)
        if self.unapplied is not None:
            tokens, blocks = self.unapplied(replica, now)
            compared["pending"] += bool(tokens or (blocks is not None and blocks()))
        self.observe(replica, now)  # (bringing it up to date at a read changes no result)
        # the lazy view's KV fields are computed only now, after the replica changed: they
        # must come from what was taken with the view
        rep = self.replicas[replica]
        assert lazy == rep.view(now)
        # the per-adapter counts the replica keeps for its policy (`QueueView.counts`)
        assert rep.queue_counts() == Counter(r.adapter_id for r in rep.unfinished)
        assert all(n > 0 for n in rep.queue_counts().values())
        compared["n"] += 1
        return lazy

    monkeypatch.setattr(Cluster, "view_of", checked)
    monkeypatch.setattr(Cluster, "views_of", lambda self, ids, now: [checked(self, i, now) for i in ids])
    sc = load_scenario(QUICKSTART, ["run.progress=false", "cluster.replicas=3", "workload.num_requests=150",
                                    "workload.arrival.rate_per_s=6", *sets])
    simulate(sc)
    assert compared["n"] > 50 and compared["pending"] > 0  # views of replicas mid-jump were read
