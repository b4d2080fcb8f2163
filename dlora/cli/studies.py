"""`dlora capacity | plan | reproduce | validate`: the questions the drivers answer (throughput
under the SLO, capacity planning, the paper's figures, live against simulated)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import (
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
) -> None:
    """Throughput under the SLO: the largest rate whose mean latency per token meets it, per variant."""
    from rich.table import Table

    from ..studies.capacity import capacity_by_variant

    with user_errors():
        sc = load_checked(scenario, overrides)

        def show(variant: str, p: Any) -> None:
            err.print(f"{variant or sc.name}: {p.rate:.4g} req/s -> mean latency/token "
                      f"{p.latency_per_token_s} s {'ok' if p.ok else 'over the SLO'}", highlight=False,
                      markup=False)

        results = capacity_by_variant(sc, low, high, tol, rate_key, requests_per_rate or None, show)
    table = Table(title=f"{sc.name}: max rate with mean latency/token <= {sc.slo.latency_per_token_s} s")
    for col in ("variant", "max rate (req/s)", "search path: rate -> mean latency/token (s)"):
        table.add_column(col)
    for name, res in results.items():
        steps = ", ".join(f"{p.rate:.3g}->{p.latency_per_token_s if p.latency_per_token_s is None else round(p.latency_per_token_s, 3)}"
                          f"{'' if p.ok else '(x)'}" for p in res.path)
        table.add_row(name or sc.name, f"{res.rate:.3g}", steps)
    out.print(table)
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
    from rich.table import Table

    from ..studies.plan import plan_replicas

    with user_errors():
        sc = load_checked(scenario, overrides)

        def show(step: Any) -> None:
            p = step.probe
            lat = "-" if p.latency_per_token_s is None else f"{p.latency_per_token_s:.4g}"
            err.print(f"{step.variant}: {step.replicas} replicas at {target_rate:g} req/s -> mean latency/token "
                      f"{lat} s, {p.unfinished} unfinished: {'meets' if p.ok else 'misses'} the SLO", highlight=False,
                      markup=False)

        result = plan_replicas(sc, target_rate, min_replicas, max_replicas,
                               requests_per_rate=requests_per_rate or None, on_step=show)
    table = Table(title=f"{sc.name}: replicas for {target_rate:g} req/s at mean latency/token <= {sc.slo.latency_per_token_s} s")
    for col in ("policy variant", "fewest replicas", "mean latency/token (s)", "search path (replicas: ok/x)"):
        table.add_column(col)
    for v in result.variants:
        path = ", ".join(f"{s.replicas}:{'ok' if s.probe.ok else 'x'}" for s in result.steps if s.variant == v.variant)
        table.add_row(v.variant, "-" if v.replicas is None else str(v.replicas),
                      "-" if v.latency_per_token_s is None else f"{v.latency_per_token_s:.4g}", path)
    out.print(table)
    ans = result.answer
    if ans is None:
        out.print(f"no policy meets the SLO at {target_rate:g} req/s with up to {max_replicas} replicas")
    else:
        out.print(f"answer: {ans.replicas} replicas with {ans.variant}")
    if out_dir is not None:
        write_json(out_dir, "plan.json", {"scenario": sc.name, **result.as_dict()})
    if ans is None:
        raise typer.Exit(1)


def reproduce(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for REPORT.md and plots",
                                          callback=check_out_dir)] = Path("out/reproduce"),
    quick: Annotated[bool, typer.Option("--quick", help="smaller clusters and fewer points (minutes)")] = False,
    only: Annotated[str | None, typer.Option("--only", help="comma-separated figures, e.g. fig9,fig10")] = None,
) -> None:
    """Run the paper's scenarios and write REPORT.md: the paper's claim beside ours, per figure."""
    import time

    from ..studies.reproduce import reproduce as run_all

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        err.print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", highlight=False, markup=False)

    with user_errors():
        figures, path = run_all(out_dir, quick, [k.strip() for k in only.split(",")] if only else None, progress)
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
    from rich.table import Table

    from ..scenario import load_scenario
    from ..studies.validate import validate

    if against is not None or profile is not None:
        _validate_against(scenario, against, profile, out_dir, overrides or [])
        return
    if scenario is None:
        fail("give a scenario YAML, or --against RUN_DIR --profile FILE")
    with user_errors():
        sc = load_scenario(scenario, overrides or [])
        result = validate(sc, out_dir, device=device, repeats=repeats)
    table = Table(title=f"{sc.name}: live vs simulated ({Path(result.profile).name})", header_style="bold")
    table.add_column("metric", justify="right", no_wrap=True)
    for col in ("live", "live min-max", "simulated", "rel. error", "goal"):
        table.add_column(col, justify="right")
    for r in result.rows:
        spread = "-" if r.live_min is None or r.live_max is None else f"{r.live_min:.3g}-{r.live_max:.3g}"
        table.add_row(r.metric, "-" if r.live is None else f"{r.live:.4g}", spread,
                      "-" if r.simulated is None else f"{r.simulated:.4g}",
                      "-" if r.rel_error is None else f"{r.rel_error * 100:+.1f}%",
                      "" if r.goal is None else f"<= {r.goal * 100:.0f}% {'ok' if r.meets_goal else 'missed'}")
    out.print(table)
    for line in result.notes:
        err.print(line, highlight=False)


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
