"""`dlora capacity | plan | reproduce`: the questions the simulator answers (throughput under
the SLO, capacity planning, the paper's figures). Registered on the app of `dlora.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .cli import OutOpt, RequestsPerRateOpt, SetOpt, app, check_out_dir, err, fail, out, write_json
from .errors import DloraError


@app.command()
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

    from .build import check_scenario
    from .scenario import load_scenario
    from .studies.capacity import capacity_by_variant

    try:
        sc = load_scenario(scenario, overrides or [])
        check_scenario(sc)

        def show(variant: str, p: Any) -> None:
            err.print(f"{variant or sc.name}: {p.rate:.4g} req/s -> mean latency/token "
                      f"{p.latency_per_token_s} s {'ok' if p.ok else 'over the SLO'}", highlight=False,
                      markup=False)

        results = capacity_by_variant(sc, low, high, tol, rate_key, requests_per_rate or None, show)
    except DloraError as exc:
        fail(str(exc))
        return
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


@app.command()
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

    from .build import check_scenario
    from .scenario import load_scenario
    from .studies.plan import plan_replicas

    try:
        sc = load_scenario(scenario, overrides or [])
        check_scenario(sc)

        def show(step: Any) -> None:
            p = step.probe
            lat = "-" if p.latency_per_token_s is None else f"{p.latency_per_token_s:.4g}"
            err.print(f"{step.variant}: {step.replicas} replicas at {target_rate:g} req/s -> mean latency/token "
                      f"{lat} s, {p.unfinished} unfinished: {'meets' if p.ok else 'misses'} the SLO", highlight=False,
                      markup=False)

        result = plan_replicas(sc, target_rate, min_replicas, max_replicas,
                               requests_per_rate=requests_per_rate or None, on_step=show)
    except DloraError as exc:
        fail(str(exc))
        return
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


@app.command()
def reproduce(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for REPORT.md and plots",
                                          callback=check_out_dir)] = Path("out/reproduce"),
    quick: Annotated[bool, typer.Option("--quick", help="smaller clusters and fewer points (minutes)")] = False,
    only: Annotated[str | None, typer.Option("--only", help="comma-separated figures, e.g. fig9,fig10")] = None,
) -> None:
    """Run the paper's scenarios and write REPORT.md: the paper's claim beside ours, per figure."""
    import time

    from .studies.reproduce import reproduce as run_all

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        err.print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", highlight=False, markup=False)

    try:
        figures, path = run_all(out_dir, quick, [k.strip() for k in only.split(",")] if only else None, progress)
    except DloraError as exc:
        fail(str(exc))
        return
    for f in figures:
        verdict = {True: "shape matches", False: "shape differs", None: ""}[f.shape_matches]
        out.print(f"[bold]{f.key}[/bold] ({verdict}): {f.ours}", highlight=False)
    out.print(f"wrote {path}")
