"""`dlora run`: a scenario's workload replayed on wall time through the real executor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import OutOpt, QuietOpt, SetOpt, err, load_checked, show_outcome, user_errors


def run_live(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (model.path: a model folder; the demo if unset)")],
    out_dir: OutOpt = None,
    overrides: SetOpt = None,
    quiet: QuietOpt = False,
    ray: Annotated[bool, typer.Option("--ray", help="replicas as Ray actors (a local Ray unless --ray-address)")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="address of a running Ray cluster")] = None,
) -> None:
    """Run a scenario live: replay its workload on wall time through the real executor."""
    from ..live.driver import run_live as run_scenario_live
    from ..output import StatusLine

    address = ray_address or ("local" if ray else None)
    with user_errors():
        sc = load_checked(scenario, overrides)
        with StatusLine(err, sc.run.progress) as status:
            outcome, ok = run_scenario_live(sc, out_dir, progress=status.progress, ray_address=address,
                                            status=status)
    show_outcome(outcome, quiet)
    if not ok:
        raise typer.Exit(1)
