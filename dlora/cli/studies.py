"""`dlora capacity | plan | reproduce | validate`: the questions the drivers answer (throughput
under the SLO, capacity planning, the paper's figures, live against simulated)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
    JobsOpt,
    OutOpt,
    RequestsPerRateOpt,
    SetOpt,
    check_out_dir,
    err,
    fail,
    load_checked,
    out,
    user_errors,
    write_json,
)


def capacity(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (its sweep variants are compared)")],
    low: Annotated[float, typer.Option("--low", help="lowest rate to try (req/s)")] = 1.0,
    high: Annotated[float, typer.Option("--high", help="first upper rate (doubled while it passes)")] = 16.0,
    tol: Annotated[float, typer.Option("--tol", help="stop when the bracket is this narrow (req/s)")] = 0.5,
    rate_key: Annotated[str, typer.Option("--rate-key", help="key path of the rate")] = "workload.arrival.rate_per_s",
    requests_per_rate: RequestsPerRateOpt = 100.0,
    overrides: SetOpt = None,
    out_dir: OutOpt = None,
    jobs: JobsOpt = 1,
) -> None:
    """Throughput under the SLO: the largest rate whose mean latency per token meets it, per variant."""
    from ..output import StatusLine
    from ..studies.capacity import capacity_by_variant, probe_line
    from ..studies.tables import capacity_reasons, capacity_table

    with user_errors():
        sc = load_checked(scenario, overrides)

        def show(variant: str, p: Any) -> None:
            err.print(probe_line(variant or sc.name, p), highlight=False, markup=False, soft_wrap=True)

        with StatusLine(err, sc.run.progress) as status:
            results = capacity_by_variant(sc, low, high, tol, rate_key, requests_per_rate or None, show,
                                          status=status, jobs=jobs)
    out.print(capacity_table(sc.name, sc.slo.latency_per_token_s, results))
    for line in capacity_reasons(sc.name, results):
        out.print(line, highlight=False, markup=False)
    if out_dir is not None:
        write_json(out_dir, "capacity.json", {"scenario": sc.name, "variants": {k: v.as_dict() for k, v in results.items()}})


def plan(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (its sweep variants are the candidate policies)")],
    target_rate: Annotated[float, typer.Option("--target-rate", help="offered load to serve (req/s)")],
    min_replicas: Annotated[int, typer.Option("--min-replicas", help="smallest replica count to try")] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas", help="largest replica count to try")] = 256,
    requests_per_rate: RequestsPerRateOpt = 100.0,
    overrides: SetOpt = None,
    out_dir: OutOpt = None,
) -> None:
    """Capacity planning: the fewest replicas, and the policy, that keep the SLO at a target rate."""
    from ..output import StatusLine
    from ..studies.plan import plan_replicas, step_line
    from ..studies.tables import plan_answer, plan_reasons, plan_table

    with user_errors():
        sc = load_checked(scenario, overrides)

        def show(step: Any) -> None:
            err.print(step_line(step, target_rate), highlight=False, markup=False, soft_wrap=True)

        with StatusLine(err, sc.run.progress) as status:
            result = plan_replicas(sc, target_rate, min_replicas, max_replicas,
                                   requests_per_rate=requests_per_rate or None, on_step=show, status=status)
    out.print(plan_table(sc.name, result))
    for line in plan_reasons(result):
        out.print(line, highlight=False, markup=False)
    ans = result.answer
    out.print(plan_answer(result, max_replicas))
    if out_dir is not None:
        write_json(out_dir, "plan.json", {"scenario": sc.name, **result.as_dict()})
    if ans is None:
        raise typer.Exit(1)


def reproduce(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for REPORT.md and plots",
                                          callback=check_out_dir)] = Path("out/reproduce"),
    quick: Annotated[bool, typer.Option("--quick", help="smaller clusters and fewer points (minutes)")] = False,
    only: Annotated[str | None, typer.Option("--only", help="comma-separated figures, e.g. fig9,fig10")] = None,
    jobs: JobsOpt = 1,
) -> None:
    """Run the paper's scenarios and write REPORT.md: the paper's claim beside ours, per figure."""
    import time

    from ..studies.reproduce import reproduce as run_all

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        err.print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", highlight=False, markup=False)

    with user_errors():
        figures, path = run_all(out_dir, quick, [k.strip() for k in only.split(",")] if only else None, progress,
                                jobs=jobs)
    for f in figures:
        verdict = {True: "shape matches", False: "shape differs", None: ""}[f.shape_matches]
        out.print(f"[bold]{f.key}[/bold] ({verdict}): {f.ours}", highlight=False)
    out.print(f"wrote {path}")


def validate_cmd(
    scenario: Annotated[Path | None, typer.Argument(help="scenario YAML (model.profile: the measured profile)")] = None,
    out_dir: OutOpt = None,
    overrides: SetOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda (default: cuda if available)")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="live runs to average (the simulator is deterministic)")] = 1,
    against: Annotated[Path | None, typer.Option("--against", help="a real serving run's folder (vllm/requests.jsonl, vllm/meta.json) to replay instead of running live")] = None,
    profile: Annotated[Path | None, typer.Option("--profile", help="latency profile YAML to simulate with (with --against)")] = None,
) -> None:
    """Run a scenario live, simulate the identical requests with its profile, compare side by side
    (or, with --against RUN_DIR --profile FILE, replay a real serving run in the simulator)."""
    from ..output import StatusLine
    from ..scenario import load_scenario
    from ..studies.tables import validate_table
    from ..studies.validate import validate

    if against is not None or profile is not None:
        _validate_against(scenario, against, profile, out_dir, overrides or [])
        return
    if scenario is None:
        fail("give a scenario YAML, or --against RUN_DIR --profile FILE")
    with user_errors():
        sc = load_scenario(scenario, overrides or [])
        with StatusLine(err, sc.run.progress) as status:
            result = validate(sc, out_dir, device=device, repeats=repeats, status=status)
    out.print(validate_table(sc.name, result))
    for line in result.notes:
        err.print(line, highlight=False, markup=False)


def _validate_against(scenario: Path | None, against: Path | None, profile: Path | None, out_dir: Path | None,
                      overrides: list[str]) -> None:
    if scenario is not None:
        fail("give either a scenario YAML (live vs simulated) or --against RUN_DIR, not both")
    if against is None:
        fail("--profile goes with --against RUN_DIR (a scenario names its profile in model.profile)")
    if profile is None:
        fail("--against needs --profile FILE (the latency profile to simulate with)")
    from ..studies.against import validate_against
    from ..studies.against_output import table

    with user_errors():
        result = validate_against(against, profile, out_dir, overrides)
    out.print(table(result))
    for line in result.notes:
        err.print(line, highlight=False)
