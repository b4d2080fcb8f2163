"""`dlora simulate`: a scenario (or its sweep) on virtual time with its latency profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import OutOpt, QuietOpt, SetOpt, load_checked, show_outcome, user_errors, with_progress


def simulate(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML")],
    out_dir: OutOpt = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Simulate a scenario on virtual time with its latency profile."""
    from ..studies.run import run_scenario

    with user_errors():
        sc = load_checked(scenario, overrides)
        outcome = with_progress(sc.run.progress, lambda progress: run_scenario(sc, out_dir, progress=progress))
    show_outcome(outcome, quiet)
