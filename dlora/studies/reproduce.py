"""`dlora reproduce`: run the paper's scenarios (PAPER.md section 7) and write REPORT.md with
tables, PNG plots, the paper's claim beside ours for every figure, and every deviation stated.

Each figure is a function that takes the settings (quick or full), runs library functions that
exist for users too (sweeps, the SLO-throughput search) on the committed scenarios in
`scenarios/paper/`, and returns a `Figure`. Quick mode shrinks clusters, request counts and
sweep points so the whole set runs in minutes on a laptop CPU; it says so in the report.

Every 7B figure runs twice: on the modern derived profile (`a800-llama-2-7b.yaml`) and under
the costs the paper's artifact measured (`a800-llama-2-7b-artifact.yaml`: 15 ms merged vs
27 ms unmerged at batch 16, 20 ms switches), so the report shows the paper, this project on
modern kernels and this project under the paper's costs. Each figure's `checks` test the
paper's stated trend with a margin; a failed check prints "no" with its reason."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .figs_cluster import fig2b, fig9, fig11a, fig11a_checks, fig11b, fig12
from .figs_replica import fig10, fig10_checks, fig13, free_lora_profile
from .figure import ARTIFACT_PROFILE, PAPER, Check, Figure, Settings, fmt_cell, sweep_table

__all__ = ["ARTIFACT_FIGURES", "FIGURES", "PAPER", "Check", "Figure", "Settings", "fig10_checks", "fig11a_checks",
           "fmt_cell", "free_lora_profile", "reproduce", "sweep_table"]

FIGURES: dict[str, Callable[[Settings], Figure]] = {
    "fig2b": fig2b, "fig9": fig9, "fig10": fig10, "fig11a": fig11a, "fig11b": fig11b, "fig12": fig12, "fig13": fig13,
}
ARTIFACT_FIGURES = ("fig9", "fig10", "fig11a", "fig11b", "fig12")  # 7B figures that depend on the costs


def reproduce(out_dir: Path, quick: bool, only: list[str] | None = None,
              progress: Callable[[str], None] = lambda msg: None,
              artifact: bool = True, jobs: int = 1) -> tuple[list[Figure], Path]:
    keys = only or list(FIGURES)
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        raise ConfigError(f"--only: unknown figure {unknown[0]!r} (known: {', '.join(FIGURES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(quick, out_dir, progress, jobs=jobs)
    art = Settings(quick, out_dir / "artifact", progress, profile=ARTIFACT_PROFILE, jobs=jobs)
    figures = []
    t0 = time.perf_counter()
    for key in keys:
        progress(f"{key}: running")
        t = time.perf_counter()
        fig = FIGURES[key](settings)
        fig.seconds = time.perf_counter() - t
        progress(f"{key}: done in {fig.seconds:.0f} s")
        if artifact and key in ARTIFACT_FIGURES:
            progress(f"{key} (artifact profile): running")
            art.out_dir.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            fig.artifact = FIGURES[key](art)
            fig.artifact.profile = "artifact"
            fig.artifact.seconds = time.perf_counter() - t
            progress(f"{key} (artifact profile): done in {fig.artifact.seconds:.0f} s")
        figures.append(fig)
    from .report_md import write_report_md

    path = write_report_md(out_dir / "REPORT.md", figures, quick, time.perf_counter() - t0,
                           left_out=[k for k in FIGURES if k not in keys])
    return figures, path
