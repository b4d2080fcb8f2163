"""`dlora profile [options]` (measure the executor) and `dlora profile import llmservingsim DIR`
(build a profile from LLMServingSim's published measurements)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import DloraError
from .common import err, fail, out

if TYPE_CHECKING:
    from ..profiling.sweep import Sweep

profile_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
profile_import_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                                 help="Build a profile from another tool's published measurements.")
profile_app.add_typer(profile_import_app, name="import")


@profile_app.callback(invoke_without_command=True)
def profile_cmd(
    ctx: typer.Context,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda")] = "cpu",
    model: Annotated[Path | None, typer.Option("--model", help="Hugging Face Llama folder (the embedded demo if unset)")] = None,
    model_config: Annotated[str | None, typer.Option("--model-config", help="shape only: llama-2-7b | llama-2-13b | llama-2-70b | demo | a config.json (needs --dummy-weights)")] = None,
    dummy_weights: Annotated[bool, typer.Option("--dummy-weights", help="random weights of the model's shape, made in memory")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="a smaller sweep (minutes on a CPU)")] = False,
    out_path: Annotated[Path | None, typer.Option("--out", help="profile YAML to write (default: print it)")] = None,
    adapters: Annotated[int | None, typer.Option("--adapters", help="most distinct adapters in an unmerged batch")] = None,
    ranks: Annotated[str | None, typer.Option("--ranks", help="LoRA ranks to sweep, e.g. 8,16")] = None,
    repeats: Annotated[int | None, typer.Option("--repeats", help="measurement rounds (median)")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option("--max-batch-tokens", help="cap the prefill sweep")] = None,
    max_seqs: Annotated[int | None, typer.Option("--max-seqs", help="cap the decode batch sizes")] = None,
    max_context: Annotated[int | None, typer.Option("--max-context", help="cap the decode contexts")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch intra-op threads (CPU)")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="replicas stepping at once in this process (as a live run with that many replicas)")] = 1,
    device_memory_gib: Annotated[float | None, typer.Option("--device-memory-gib", help="memory of the device in the profile (CPU: a budget)")] = None,
    notes: Annotated[str, typer.Option("--notes", help="text for provenance.notes")] = "",
) -> None:
    """Measure the real executor over batch shapes and fit a latency profile (YAML); or
    `dlora profile import llmservingsim DIR` to build one from LLMServingSim's measurements."""
    if ctx.invoked_subcommand is not None:
        return
    import shlex
    import time

    from rich.markup import escape

    from ..profiling.fit import poor_fit_warning

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        err.print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", highlight=False)

    try:
        import torch

        from ..profiling.measure import profile

        if device not in ("cpu", "cuda"):
            raise DloraError(f"--device {device!r}: use cpu or cuda")
        if concurrency < 1:
            raise DloraError("--concurrency must be at least 1")
        if threads is not None:
            torch.set_num_threads(threads)
        sweep = _sweep(quick, ranks, adapters, repeats).trimmed(max_batch_tokens, max_seqs, max_context)
        mem = int(device_memory_gib * (1 << 30)) if device_memory_gib else None
        command = "dlora profile " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["profile"] else "dlora profile"
        result = profile(model_dir=model, model_config=model_config, dummy_weights=dummy_weights, device=device,
                         sweep=sweep, concurrency=concurrency, device_memory_bytes=mem, command=command,
                         notes=notes, progress=progress)
        text = write_profile(result.profile, out_path)
    except DloraError as exc:
        fail(str(exc))
    fe = result.profile.fit_error
    err.print(f"fit error on held-out points: steps mean {fe.get('step_mean_rel', 0) * 100:.1f}% "
              f"max {fe.get('step_max_rel', 0) * 100:.1f}%", highlight=False)
    warning = poor_fit_warning(fe)
    if warning is not None:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)
    if out_path is None:
        out.print(text, highlight=False, soft_wrap=True)
    else:
        err.print(f"wrote {out_path}", highlight=False)


def _sweep(quick: bool, ranks: str | None, adapters: int | None, repeats: int | None) -> Sweep:
    """The sweep the options ask for (`--quick`, `--ranks`, `--adapters`, `--repeats`)."""
    from dataclasses import replace

    from ..profiling.sweep import QUICK, Sweep

    sweep = QUICK if quick else Sweep()
    if ranks is not None:
        try:
            sweep = replace(sweep, ranks=tuple(sorted({int(r) for r in ranks.split(",")})))
        except ValueError:
            raise DloraError(f"--ranks {ranks!r}: give comma-separated integers, e.g. 8,16") from None
    if adapters is not None:
        sweep = replace(sweep, num_adapters=tuple(sorted({1, *(n for n in sweep.num_adapters if n < adapters), adapters})))
    if repeats is not None:
        sweep = replace(sweep, repeats=max(2, repeats))
    return sweep


def write_profile(profile: Any, out_path: Path | None) -> str:
    """The profile's YAML; written to `out_path` (when given) only once it loads back."""
    from ..profile import load_profile

    text = str(profile.dump())
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(text)
        load_profile(tmp)  # validate before it replaces anything
        tmp.replace(out_path)
    return text


@profile_import_app.command("llmservingsim")
def profile_import_llmservingsim(
    folder: Annotated[Path, typer.Argument(help="LLMServingSim profiler/perf/<hardware>/<model>/<variant>/ (meta.yaml, tp*/)")],
    out_path: Annotated[Path | None, typer.Option("--out", help="profile YAML to write (default: print it)")] = None,
    tp: Annotated[int | None, typer.Option("--tp", help="tensor-parallel degree: picks tp<N>/ (default: the smallest there)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="the model's Hugging Face config.json (needed when the model has no built-in shape)")] = None,
    device_memory_gib: Annotated[float | None, typer.Option("--device-memory-gib", help="memory of one GPU (default: the known-GPU table)")] = None,
    link_gbps: Annotated[float | None, typer.Option("--link-gbps", help="tensor parallel: all-reduce bandwidth between the GPUs in GB/s (default: the known-GPU table)")] = None,
    link_latency_us: Annotated[float | None, typer.Option("--link-latency-us", help="tensor parallel: fixed time of one all-reduce in us (default: the known-GPU table)")] = None,
) -> None:
    """Import LLMServingSim's layer-wise vLLM profile (MIT) as a dlora profile."""
    import shlex

    from ..profiling.llmservingsim import import_llmservingsim

    try:
        command = "dlora profile import llmservingsim " + shlex.join(sys.argv[4:]) if sys.argv[1:4] == [
            "profile", "import", "llmservingsim"] else "dlora profile import llmservingsim"
        profile, found = import_llmservingsim(folder, tp=tp, config=config, device_memory_gib=device_memory_gib,
                                              command=command, link_gbps=link_gbps, link_latency_us=link_latency_us)
        text = write_profile(profile, out_path)
    except DloraError as exc:
        fail(str(exc))
    fe = profile.fit_error
    err.print(f"fit error (mean / max relative): attention {fe['attention_mean_rel']:.1%} / {fe['attention_max_rel']:.1%}, "
              f"linear {fe['linear_mean_rel']:.1%} / {fe['linear_max_rel']:.1%}", highlight=False)
    for c in found:
        err.print(f"  {c.label}: measured (composed) {c.composed_s * 1e3:.2f} ms, profile {c.predicted_s * 1e3:.2f} ms "
                  f"({c.rel_error:+.1%})", highlight=False)
    if out_path is None:
        out.print(text, highlight=False, soft_wrap=True)
    else:
        err.print(f"wrote {out_path}", highlight=False)
