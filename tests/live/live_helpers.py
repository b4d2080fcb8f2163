"""Helpers of the live-driver tests: small scenarios and scripted executors that sleep
(a module of its own: `conftest` is a name several test folders share)."""

from __future__ import annotations

import time
from pathlib import Path

from dlora.scenario import load_scenario
from dlora.testing import ScriptedExecutor
from dlora.types import Batch, StepResult

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
LIVE_DEMO = ROOT / "scenarios" / "live-demo.yaml"


def scenario(*sets: str, path: Path = QUICKSTART):
    return load_scenario(path, ["run.progress=false", "run.fast_path=false", *sets])


class SleepingExecutor(ScriptedExecutor):
    """Fixed timings that really pass on the wall clock; token ids = the step number."""

    def execute(self, batch: Batch) -> StepResult:
        res = super().execute(batch)
        time.sleep(res.elapsed_s)
        return res


def tokens_script(step_s: float = 0.01):
    """A script whose steps return a token id per sampling item (100 + the batch step)."""

    def script(batch: Batch) -> StepResult:
        n = sum(it.samples for it in batch.items)
        return StepResult(step_s, token_ids=(100 + batch.step,) * n, eos=(False,) * n)

    return script
