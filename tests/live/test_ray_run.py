"""`dlora run --ray`: replicas are Ray actors; killing one mid-run loses no request.
Skipped only where Ray is not installed or cannot start here."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="the ray package is not installed")
pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_ray():
    """A Ray of our own (another module's server may hold every CPU of a running one)."""
    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()


def test_dlora_run_on_ray_kills_a_replica_actor_and_loses_nothing(fresh_ray):
    """`dlora run --ray`: a killed actor's requests are recomputed elsewhere, every request
    completes, and the replica is restarted."""
    from pathlib import Path

    from dlora.live.driver import run
    from dlora.live.ray_replicas import ray_run_hooks
    from dlora.scenario import load_scenario
    from dlora.types import RequestStatus

    root = Path(__file__).resolve().parents[2]
    sc = load_scenario(root / "scenarios" / "live-demo.yaml",
                       ["workload.num_requests=12", "workload.arrival.rate_per_s=6"])
    factory, on_created = ray_run_hooks(sc, "local")
    killed = []

    def kill_first(live) -> None:
        on_created(live)

        def later() -> None:
            time.sleep(0.5)  # mid-run: requests arrive over 2 s
            ray.kill(live.executors[0].actor)
            killed.append(live.now())

        threading.Thread(target=later, daemon=True).start()

    result = run(sc, executor_factory=factory, max_step_failures=1, on_created=kill_first)
    assert all(r.status == RequestStatus.FINISHED for r in result.requests)
    assert all(r.generated_tokens == r.output_tokens for r in result.requests)
    assert killed and result.live["failed_steps"] >= 1
