"""What every command shares: the app's consoles (table on stdout, notes and errors on stderr),
`fail` (exit 2 on bad usage or input), the shared options, the scenario preamble (load, apply
`--set`, check) and the progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from ..errors import DloraError

if TYPE_CHECKING:
    from ..scenario import Scenario

T = TypeVar("T")
ProgressFn = Callable[[int, int], None]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="dlora: serve and simulate many LoRA adapters of one base LLM (dLoRA, OSDI'24).")
err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr (the message printed as written, never as rich markup), then exit."""
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """A `DloraError` (bad input, a failed check) inside the block becomes `fail(message)`."""
    try:
        yield
    except DloraError as exc:
        fail(str(exc))


def check_out_dir(value: Path | None) -> Path | None:
    """`--out` must name a folder, existing or not (then created): a path that is a file, or lies
    under one, fails at parse time, before any work."""
    if value is None:
        return None
    for path in (value, *value.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == value else f" ({path} is a file)"
                fail(f"--out {value}: not a folder{where}; name a folder (created if missing)")
            break
    return value


SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a scenario field: key.path=value")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="output folder (report.json, requests.csv, plots)",
                                             callback=check_out_dir)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no table")]
JobsOpt = Annotated[int, typer.Option("--jobs", min=1, help="capacity searches run at once, one per "
                                     "variant, in worker processes (results unchanged)")]
RequestsPerRateOpt = Annotated[float, typer.Option(
    "--requests-per-rate", help="requests per probe = this x rate (paper: 100); 0 keeps num_requests")]


def load_checked(scenario: Path, overrides: list[str] | None) -> Scenario:
    """The preamble of the scenario commands: read the YAML, apply `--set`, check it against the
    registries before any work (raises `DloraError`)."""
    from ..build import check_scenario
    from ..scenario import load_scenario

    sc = load_scenario(scenario, overrides or [])
    check_scenario(sc)
    return sc


def write_json(out_dir: Path, name: str, data: Any) -> None:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    err.print(f"wrote {name} to {out_dir}", highlight=False, markup=False)


def show_outcome(outcome: Any, quiet: bool) -> None:
    """The table on stdout (unless quiet), the run's notes on stderr."""
    if not quiet:
        outcome.print(out)
    for line in outcome.notes:
        err.print(line, highlight=False, markup=False)


def with_progress(enabled: bool, call: Callable[[ProgressFn | None], T]) -> T:
    """`call(progress)` under a progress bar on stderr (`progress(done, total)`), when enabled and
    stderr is a terminal; else `call(None)`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled or not err.is_terminal:
        return call(None)
    prog = Progress(TextColumn("simulating"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=True)
    task = prog.add_task("sim", total=1)

    def update(done: int, total: int) -> None:
        if done % 200 == 0 or done == total:
            prog.update(task, completed=done, total=total)

    with prog:
        return call(update)
