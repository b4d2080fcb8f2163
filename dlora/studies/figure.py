"""A reproduced figure (`Figure`: the paper's claim, our table, plots, checks, deviations), the
settings a figure function runs under (quick or full, which profile), and the helpers the
figure functions share (`dlora reproduce`, `reproduce.py`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..scenario import Scenario, load_scenario

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "scenarios" / "paper"
AZURE_TRACE = ROOT.parent / "shared" / "data" / "azure_llm_inference_2023" / "AzureLLMInferenceTrace_conv.csv"


ARTIFACT_PROFILE = "../../profiles/a800-llama-2-7b-artifact.yaml"
PROFILES = {"modern": None, "artifact": ARTIFACT_PROFILE}  # tag -> 7B profile override


@dataclass
class Settings:
    quick: bool
    out_dir: Path
    progress: Callable[[str], None] = lambda msg: None
    profile: str | None = None  # overrides the 7B scenarios' profile (the artifact's costs)
    jobs: int = 1  # capacity searches at once (`capacity_by_variant`)

    @property
    def requests_per_rate(self) -> float:
        return 30.0 if self.quick else 100.0

    @property
    def rel_tol(self) -> float:
        """Stop bisecting when the bracket is this share of the rate."""
        return 0.1 if self.quick else 0.05

    def on_probe(self, variant: str, p: Any) -> None:
        lat = "-" if p.latency_per_token_s is None else f"{p.latency_per_token_s:.3g}"
        self.progress(f"  {variant or 'probe'} {p.rate:.3g} req/s: {lat} s/token {'ok' if p.ok else 'over'}")


@dataclass(frozen=True)
class Check:
    name: str  # the paper's trend, with its margin
    ok: bool
    detail: str  # our numbers behind the verdict


@dataclass
class Figure:
    key: str
    title: str
    claim: str
    ours: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    profile: str = "modern"
    artifact: Figure | None = None  # the same figure under the artifact's costs

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def shape_matches(self) -> bool | None:
        return all(c.ok for c in self.checks) if self.checks else None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def load_paper(name: str, sets: list[str], s: Settings | None = None) -> Scenario:
    """A paper scenario with `sets`; under `s.profile`, 7B scenarios take that profile."""
    if s is not None and s.profile is not None and not any(x.startswith("model.profile=") for x in sets):
        sets = [f"model.profile={s.profile}", *sets]
    return load_scenario(PAPER / name, sets)


def with_variants(sc: Scenario, **changes: dict[str, Any]) -> str:
    """A `sweep.variants=...` override: the scenario's variants with `changes` merged in."""
    assert sc.sweep is not None and sc.sweep.variants is not None
    out = {k: dict(v) for k, v in sc.sweep.variants.items()}
    for name, extra in changes.items():
        out.setdefault(name, {}).update(extra)
    return "sweep.variants=" + json.dumps(out)


def fmt_cell(v: Any) -> str:
    """A table cell: 3 significant digits, "-" for none, "inf" for an unbounded ratio."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.3g}"
    return str(v)


def sweep_table(rows: list[dict[str, Any]], parameter: str, metric: str) -> dict[Any, dict[str, Any]]:
    """{parameter value: {variant: metric}} from a sweep's rows."""
    table: dict[Any, dict[str, Any]] = {}
    for r in rows:
        table.setdefault(r[parameter], {})[r["variant"]] = r[metric]
    return table
