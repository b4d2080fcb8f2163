"""`dlora simulate | profile | run | serve | ...`: parse, call one library function, print a
table to stdout, write outputs; logs and progress on stderr. Exit 0 on success, 1 on a failed
run, 2 on bad usage or input. torch is imported only inside the executor commands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .errors import DloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="dlora: serve and simulate many LoRA adapters of one base LLM (dLoRA, OSDI'24).")
err = Console(stderr=True)
out = Console()



def fail(message: str, code: int = 2) -> None:
    """One line on stderr (the message printed as written, never as rich markup), then exit."""
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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
RequestsPerRateOpt = Annotated[float, typer.Option(
    "--requests-per-rate", help="requests per probe = this x rate (paper: 100); 0 keeps num_requests")]


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


def _progress_bar(enabled: bool):
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
    from .build import check_scenario
    from .scenario import load_scenario
    from .studies.run import run_scenario

    try:
        sc = load_scenario(scenario, overrides or [])
        check_scenario(sc)
        prog, update = _progress_bar(sc.run.progress)
        if prog is not None:
            with prog:
                outcome = run_scenario(sc, out_dir, progress=update)
        else:
            outcome = run_scenario(sc, out_dir)
    except DloraError as exc:
        fail(str(exc))
        return
    show_outcome(outcome, quiet)


@app.command("run")
def run_live(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (model.path: a model folder; the demo if unset)")],
    out_dir: OutOpt = None,
    overrides: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no table")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="replicas as Ray actors (a local Ray unless --ray-address)")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="address of a running Ray cluster")] = None,
) -> None:
    """Run a scenario live: replay its workload on wall time through the real executor."""
    from .build import check_scenario
    from .live.driver import run_live as run_scenario_live
    from .scenario import load_scenario

    try:
        sc = load_scenario(scenario, overrides or [])
        check_scenario(sc)
        prog, update = _progress_bar(sc.run.progress)
        address = ray_address or ("local" if ray else None)
        if prog is not None:
            with prog:
                outcome, ok = run_scenario_live(sc, out_dir, progress=update, ray_address=address)
        else:
            outcome, ok = run_scenario_live(sc, out_dir, ray_address=address)
    except DloraError as exc:
        fail(str(exc))
        return
    show_outcome(outcome, quiet)
    if not ok:
        raise typer.Exit(1)


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def serve_cmd(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option("--model", help="Hugging Face Llama folder (the embedded demo if unset)")] = None,
    lora_modules: Annotated[list[str] | None, typer.Option("--lora-modules", help="name=path (repeat, or list after one flag)")] = None,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="the base model's name in the API")] = None,
    max_loras: Annotated[int, typer.Option("--max-loras", help="adapter slots on the device per replica (vLLM's default is 1; dlora batches several adapters per iteration, so 4)")] = 4,
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", help="refuse adapters of higher rank (vLLM's default is 16 and it reserves every slot at that rank; dlora packs each adapter at its own rank, so a high bound reserves no memory)")] = 64,
    max_cpu_loras: Annotated[int | None, typer.Option("--max-cpu-loras", help="adapters kept in host memory per replica, an LRU cache as in vLLM (others are read again from their folder on next use); must be >= --max-loras; unset: all (vLLM: --max-loras)")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    replicas: Annotated[int, typer.Option("--replicas", help="replicas (one executor each)")] = 1,
    policy: Annotated[str, typer.Option("--policy", help="batching policy (credit = dLoRA)")] = "credit",
    dispatch: Annotated[str, typer.Option("--dispatch", help="dispatcher")] = "least_loaded",
    migration: Annotated[str, typer.Option("--migration", help="migrator")] = "none",
    max_queue: Annotated[int, typer.Option("--max-queue", help="unfinished requests before 429")] = 256,
    max_batch_size: Annotated[int, typer.Option("--max-num-seqs", help="sequences per iteration")] = 16,
    max_batched_tokens: Annotated[int, typer.Option("--max-num-batched-tokens")] = 512,
    memory_fraction: Annotated[float, typer.Option("--memory-fraction", help="share of the profile's KV memory")] = 0.01,
    profile: Annotated[str | None, typer.Option("--profile", help="latency profile YAML")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="replicas as Ray actors (a local Ray unless --ray-address)")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster to join (implies --ray)")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    api_key: Annotated[str | None, typer.Option("--api-key", envvar=["DLORA_API_KEY", "VLLM_API_KEY"], show_envvar=True, help="require `Authorization: Bearer KEY` on every /v1 route (401 without)")] = None,
    allow_runtime_lora: Annotated[bool, typer.Option("--allow-runtime-lora/--no-allow-runtime-lora", envvar=["DLORA_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"], show_envvar=True, help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter (off: 403, as vLLM)")] = False,
    allowed_adapter_roots: Annotated[list[str] | None, typer.Option("--allowed-adapter-root", help="runtime loads only from under this folder (repeat for several)")] = None,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help="chat template: a Jinja file, or the template itself (as vLLM's); replaces the model folder's")] = None,
    enable_prefix_caching: Annotated[bool, typer.Option("--enable-prefix-caching/--no-enable-prefix-caching", help="share and keep prompt KV blocks between requests of the same adapter (vLLM's automatic prefix caching; on by default, as in vLLM v1)")] = True,
) -> None:
    """Serve the OpenAI API (completions, chat, models, LoRA load/unload, metrics) over the live cluster."""
    from .live.server import ServeConfig, ServingEngine, bind_socket, parse_lora_modules, serve
    from .live.server.chat_template import load_chat_template

    try:
        template = load_chat_template(chat_template) if chat_template is not None else None
    except ValueError as exc:
        fail(f"--chat-template: {exc}")
        return
    sock = None
    try:
        sock = bind_socket(host, port)  # a taken port fails here, before the model is built
        cfg = ServeConfig(
            model=model, served_model_name=served_model_name,
            lora_modules=parse_lora_modules([*(lora_modules or []), *ctx.args]), max_loras=max_loras,
            max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras, replicas=replicas, policy=policy,
            dispatch=dispatch, migration=migration, max_queue=max_queue, max_batch_size=max_batch_size,
            max_batched_tokens=max_batched_tokens, memory_fraction=memory_fraction, profile=profile,
            device=device, ray_address=ray_address or ('local' if ray else None), api_key=api_key,
            allow_runtime_lora=allow_runtime_lora, allowed_adapter_roots=tuple(allowed_adapter_roots or ()))
        engine = ServingEngine(cfg, enable_prefix_caching=enable_prefix_caching)
        if template is not None:
            engine.codec.chat_template = template
    except DloraError as exc:
        if sock is not None:
            sock.close()
        fail(str(exc))
        return
    err.print(f"dlora serve: {engine.model_name} with {len(engine.adapters)} adapters on "
              f"http://{host}:{port}/v1 ({replicas} replica(s){', Ray' if engine.cfg.ray_address else ''}"
              f"{', API key required' if api_key else ''}"
              f"{', runtime adapter loading on' if allow_runtime_lora else ''})", highlight=False)
    serve(engine, host, port, log_level, sock=sock)


@app.command("validate")
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

    from .scenario import load_scenario
    from .studies.validate import validate

    if against is not None or profile is not None:
        _validate_against(scenario, against, profile, out_dir, overrides or [])
        return
    if scenario is None:
        fail("give a scenario YAML, or --against RUN_DIR --profile FILE")
        return
    try:
        sc = load_scenario(scenario, overrides or [])
        result = validate(sc, out_dir, device=device, repeats=repeats)
    except DloraError as exc:
        fail(str(exc))
        return
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
    from .studies.against import validate_against
    from .studies.against_output import table

    assert against is not None and profile is not None
    try:
        result = validate_against(against, profile, out_dir, overrides)
    except DloraError as exc:
        fail(str(exc))
        return
    out.print(table(result))
    for line in result.notes:
        err.print(line, highlight=False)


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


from . import cli_profile, cli_sim  # noqa: E402,F401  (register profile; capacity, plan, reproduce)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":  # `python -m dlora.cli`: run the imported module's app (cli_sim
    from dlora.cli import main as _main  # registers its commands there, not on __main__)

    _main()
