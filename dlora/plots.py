"""PNG plots with matplotlib (Agg backend, no display). Quiet: matplotlib's warnings about
empty or degenerate data (a run where every request was rejected) are not printed; such a plot
is drawn empty."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .types import Request, RequestStatus  # noqa: E402

logging.getLogger("matplotlib").setLevel(logging.ERROR)
F = TypeVar("F", bound=Callable[..., Any])


def _quiet(fn: F) -> F:
    """Run a plotting function with matplotlib's (and numpy's) data warnings silenced."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend only when something is labelled (an empty run plots no line)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


@_quiet
def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@_quiet
def plot_latency_cdf(path: Path, runs: Mapping[str, Sequence[Request]]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, reqs in runs.items():
        vals = np.sort([r.latency_per_token_s for r in reqs
                        if r.status == RequestStatus.FINISHED and r.latency_per_token_s is not None])
        if len(vals):
            ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals), label=label)
    ax.set_xlabel("latency per output token (s)")
    ax.set_ylabel("CDF")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    return _save(fig, path)


@_quiet
def plot_queue_lengths(path: Path, samples: Sequence[Sequence[tuple[float, int]]]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, s in enumerate(samples):
        if s:
            t, n = zip(*s, strict=True)
            ax.step(t, n, where="post", label=f"replica {i}", linewidth=0.8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("unfinished requests")
    ax.grid(alpha=0.3)
    if len(samples) <= 12:
        _legend(ax, fontsize=7)
    return _save(fig, path)


@_quiet
def plot_sweep(path: Path, x_label: str, xs: Sequence[Any], series: Mapping[str, Sequence[float | None]],
               y_label: str, log_y: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            px, py = zip(*pts, strict=True)
            ax.plot([str(x) for x in px] if isinstance(px[0], str) else px, py, marker="o", label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    return _save(fig, path)


@_quiet
def plot_bars(path: Path, labels: Sequence[str], series: Mapping[str, Sequence[float]], x_label: str,
              y_label: str) -> Path:
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(labels) + 2), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series.items()):
        ax.bar(np.arange(len(labels)) + i * width, ys, width, label=name)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        _legend(ax, fontsize=8)
    return _save(fig, path)
