"""The work estimates dispatch and migration read (`core/work.py`)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dlora.core.context import ReplicaConfig
from dlora.core.work import OutputLengthEstimate, WorkEstimator
from dlora.testing import latency_model, make_request


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 2000), st.integers(0, 5000)), max_size=40),
       st.lists(st.integers(1, 4000), max_size=5))
def test_seconds_for_each_is_seconds_for_of_each(reqs, finished) -> None:  # type: ignore[no-untyped-def]
    """The batched estimate a migration check reads equals the one-request estimate, bit for
    bit, whatever the requests' progress and the shared output length (the prior included)."""
    lengths = OutputLengthEstimate()
    for n in finished:
        lengths.observe(n)
    work = WorkEstimator(latency_model(), ReplicaConfig(max_batch_size=16, max_batched_tokens=4096), lengths)
    requests = []
    for i, (prompt, generated, computed) in enumerate(reqs):
        r = make_request(i, prompt=prompt, output=generated + 1)
        r.generated_tokens = generated
        r.computed_tokens = min(computed, prompt + generated)
        requests.append(r)
    assert work.seconds_for_each(requests) == [work.seconds_for(r) for r in requests]
    assert [x.hex() for x in work.seconds_for_each(requests)] == [work.seconds_for(r).hex() for r in requests]
