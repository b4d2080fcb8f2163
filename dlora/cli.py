"""`dlora simulate | profile | run | serve | ...`: parse, call one library function, print a
table to stdout, write outputs; logs and progress on stderr. Exit 0 on success, 1 on a failed
run, 2 on bad usage or input. torch is imported only inside the executor commands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import DloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="dlora: serve and simulate many LoRA adapters of one base LLM (dLoRA, OSDI'24).")
err = Console(stderr=True)
out = Console()

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a scenario field: key.path=value")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="output folder (report.json, requests.csv, plots)")]


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _progress_bar(enabled: bool):  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled or not err.is_terminal:
        return None, None
    prog = Progress(TextColumn("simulating"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=True)
    task = prog.add_task("sim", total=1)

    def update(done: int, total: int) -> None:
        if done % 200 == 0 or done == total:
            prog.update(task, completed=done, total=total)

    return prog, update


@app.command()
def simulate(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML")],
    out_dir: OutOpt = None,
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no table")] = False,
) -> None:
    """Simulate a scenario on virtual time with its latency profile."""
    from .scenario import load_scenario
    from .sim.run import run_scenario

    try:
        sc = load_scenario(scenario, overrides or [])
        prog, update = _progress_bar(sc.run.progress)
        if prog is not None:
            with prog:
                outcome = run_scenario(sc, out_dir, progress=update)
        else:
            outcome = run_scenario(sc, out_dir)
    except DloraError as exc:
        fail(str(exc))
        return
    if not quiet:
        outcome.print(out)
    for line in outcome.notes:
        err.print(line, highlight=False)


@app.command()
def capacity(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (its sweep variants are compared)")],
    low: Annotated[float, typer.Option("--low", help="lowest rate to try (req/s)")] = 1.0,
    high: Annotated[float, typer.Option("--high", help="first upper rate (doubled while it passes)")] = 16.0,
    tol: Annotated[float, typer.Option("--tol", help="stop when the bracket is this narrow (req/s)")] = 0.5,
    rate_key: Annotated[str, typer.Option("--rate-key", help="key path of the rate")] = "workload.arrival.rate_per_s",
    requests_per_rate: Annotated[float, typer.Option("--requests-per-rate", help="requests per probe = this x rate (paper: 100); 0 keeps num_requests")] = 100.0,
    overrides: SetOpt = None,
    out_dir: OutOpt = None,
) -> None:
    """Throughput under the SLO: the largest rate whose mean latency per token meets it, per variant."""
    import json

    from rich.table import Table

    from .scenario import load_scenario
    from .sim.capacity import capacity_by_variant

    try:
        sc = load_scenario(scenario, overrides or [])
        results = capacity_by_variant(sc, low, high, tol, rate_key, requests_per_rate or None)
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
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {"scenario": sc.name, "variants": {k: v.as_dict() for k, v in results.items()}}
        (out_dir / "capacity.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        err.print(f"wrote capacity.json to {out_dir}", highlight=False)


@app.command("init-demo")
def init_demo(directory: Annotated[Path, typer.Argument(help="folder to write the demo model into")]) -> None:
    """Write the embedded tiny Llama model, tokenizer and PEFT adapters (seeded, no download)."""
    try:
        from .exec.demo import write_demo

        path = write_demo(directory)
    except DloraError as exc:
        fail(str(exc))
        return
    out.print(f"wrote demo model and adapters to {path}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
