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

from .labels import Label, label  # noqa: E402
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


LOG_SPAN = 20.0  # a time axis spanning more than this ratio (max / min) is drawn log-scaled


def use_log_axis(values: Sequence[float]) -> bool:
    """A log axis only where the positive values span more than `LOG_SPAN` x; a narrow range
    (0.012-0.033 s) reads better on a linear axis, which labels more than two ticks."""
    pos = [v for v in values if v > 0]
    return bool(pos) and max(pos) / min(pos) > LOG_SPAN


def _plain_log_ticks(axis: Any) -> None:
    """Log-axis ticks labelled as plain numbers at 1, 2 and 5 of each decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


@_quiet
def plot_latency_cdf(path: Path, runs: Mapping[str, Sequence[Request]]) -> Path:
    """The CDF of latency per output token (ms) over each run's finished requests; a linear
    axis unless the values span more than `LOG_SPAN` x."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    every: list[float] = []
    total = 0
    for name, reqs in runs.items():
        vals = np.sort([r.latency_per_token_s * 1e3 for r in reqs
                        if r.status == RequestStatus.FINISHED and r.latency_per_token_s is not None])
        if len(vals):
            ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals), label=f"{name} ({len(vals):,} requests)")
            every += [float(vals[0]), float(vals[-1])]
            total += len(vals)
    ax.set_xlabel("latency per output token (ms)")
    ax.set_ylabel("fraction of finished requests")
    ax.set_ylim(0, 1.02)
    if use_log_axis(every):
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
    ax.set_title("latency per output token: CDF" + (f" over {total:,} finished requests" if len(runs) == 1 else ""))
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    return _save(fig, path)


def queue_grid(samples: Sequence[Sequence[tuple[float, int]]], bins: int = 150, per_bin: int = 16
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """Each replica's unfinished requests (a step function of its change points) averaged
    over `bins` equal time bins: bin centres (bins,), counts (replicas, bins), bin width (s)."""
    end = max((s[-1][0] for s in samples if s), default=0.0)
    width = max(end, 1e-9) / bins
    fine = (np.arange(bins * per_bin) + 0.5) * (width / per_bin)
    counts = np.zeros((len(samples), bins * per_bin))
    for i, s in enumerate(samples):
        if s:
            t = np.array([x for x, _ in s])
            n = np.array([y for _, y in s], dtype=float)
            idx = np.searchsorted(t, fine, side="right") - 1
            counts[i] = np.where(idx >= 0, n[np.clip(idx, 0, None)], 0.0)
    centres = (np.arange(bins) + 0.5) * width
    return centres, counts.reshape(len(samples), bins, per_bin).mean(axis=2), width


@_quiet
def plot_queue_lengths(path: Path, samples: Sequence[Sequence[tuple[float, int]]]) -> Path:
    """Unfinished requests over time, averaged over short bins. One replica: its line.
    Several: the cluster's total on top and, below, the median replica with the band from the
    least to the most loaded one (a line per replica would be overlapping noise)."""
    n = len(samples)
    t, counts, width = queue_grid(samples)
    if n <= 1:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        ax.plot(t, counts[0] if n else t * 0, linewidth=1.0)
        ax.set_ylabel("unfinished requests")
        axes = [ax]
    else:
        fig, (top, ax) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True, height_ratios=(1, 1.3))
        top.plot(t, counts.sum(axis=0), linewidth=1.0, color="C0")
        top.set_ylabel("all replicas")
        lo, mid, hi = counts.min(axis=0), np.median(counts, axis=0), counts.max(axis=0)
        ax.fill_between(t, lo, hi, alpha=0.3, color="C1", linewidth=0,
                        label=f"range over the {n} replicas (least to most loaded)")
        ax.plot(t, mid, linewidth=1.0, color="C1", label="median replica")
        ax.set_ylabel("per replica")
        _legend(ax, fontsize=8, loc="upper right")
        axes = [top, ax]
    for a in axes:
        _integer_ticks(a.yaxis)
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
    axes[-1].set_xlabel(f"time since the first arrival (s); mean over {width:.2g} s bins")
    axes[0].set_title(f"unfinished requests over time ({n} replica{'s' * (n != 1)})")
    return _save(fig, path)


def _style(i: int) -> dict[str, Any]:
    """Marker and dash of the i-th series, so that series that coincide stay visible."""
    return {"marker": "osD^v"[i % 5], "linestyle": ("-", "--", "-.", ":")[i % 4],
            "markersize": 7 - (i % 3), "alpha": 0.9}


def _axis(text: str) -> Label:
    """A key path (no spaces) in words with units; any other text as given."""
    return label(text) if " " not in text else Label(text)


@_quiet
def plot_sweep(path: Path, x_label: str, xs: Sequence[Any], series: Mapping[str, Sequence[float | None]],
               y_label: str, log_y: bool = False, title: str | None = None) -> Path:
    """One line per series over the swept values. `x_label` / `y_label` may be key paths
    (`workload.arrival.rate_per_s`, `latency_per_token_s.mean`): they are written in words
    with units and the values scaled to match (seconds shown in ms)."""
    xl, yl = _axis(x_label), _axis(y_label)
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (name, ys) in enumerate(series.items()):
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            px = [x * xl.scale if numeric else str(x) for x, _ in pts]
            ax.plot(px, [y * yl.scale for _, y in pts], label=name, **_style(i))
    ax.set_xlabel(xl.text)
    ax.set_ylabel(yl.text)
    if numeric and 0 < len(xs) <= 12:
        ax.set_xticks([x * xl.scale for x in xs], [f"{x * xl.scale:g}" for x in xs])
    if log_y:
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    elif yl.is_count:
        _integer_ticks(ax.yaxis)
    ax.set_title(title or f"{yl.words} by {xl.words}")
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    return _save(fig, path)


@_quiet
def plot_bars(path: Path, labels: Sequence[str], series: Mapping[str, Sequence[float]], x_label: str,
              y_label: str, title: str | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(labels) + 2), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series.items()):
        ax.bar(np.arange(len(labels)) + i * width, ys, width, label=name)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    ax.set_xlabel(_axis(x_label).text)
    ax.set_ylabel(_axis(y_label).text)
    if all(float(y).is_integer() for ys in series.values() for y in ys):
        _integer_ticks(ax.yaxis)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        _legend(ax, fontsize=8)
    return _save(fig, path)
