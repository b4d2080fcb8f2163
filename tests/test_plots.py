"""Plots a reader understands without the code: titles, words and units on the axes, a linear
axis for a narrow range, integer ticks for counts, a band instead of overlapping replica lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dlora import plots
from dlora.types import Request, RequestStatus


def finished(latencies_per_token: list[float]) -> list[Request]:
    reqs = []
    for i, lpt in enumerate(latencies_per_token):
        r = Request(i, 0, 0.0, 8, 10, status=RequestStatus.FINISHED, generated_tokens=10, finish_s=lpt * 10)
        r.first_token_s = lpt
        reqs.append(r)
    return reqs


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions save (kept open for the test to read)."""
    saved: list[Any] = []

    def keep(fig: Any, path: Path) -> Path:
        fig.canvas.draw()
        saved.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def test_log_axis_only_for_wide_ranges() -> None:
    assert not plots.use_log_axis([0.012, 0.033])  # the CDF: two tick labels on a log axis
    assert plots.use_log_axis([0.001, 0.5])
    assert not plots.use_log_axis([])


def test_latency_cdf_of_a_narrow_range_is_linear_in_ms(figures: list[Any], tmp_path: Path) -> None:
    reqs = finished([0.012 + 0.021 * i / 99 for i in range(100)])
    assert all(r.latency_per_token_s is not None for r in reqs)
    plots.plot_latency_cdf(tmp_path / "cdf.png", {"quickstart": reqs})
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "linear"
    assert ax.get_xlabel() == "latency per output token (ms)"
    assert "CDF" in ax.get_title() and "100 finished requests" in ax.get_title()
    lo, hi = ax.get_xlim()
    assert 5 < lo < 15 and 30 < hi < 40  # in ms
    labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert len(labels) >= 4


def test_latency_cdf_of_a_wide_range_is_log_with_plain_labels(figures: list[Any], tmp_path: Path) -> None:
    plots.plot_latency_cdf(tmp_path / "cdf.png", {"a": finished([0.001, 0.01, 0.5])})
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "log"
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert shown and not any("10^" in s or "$" in s for s in shown)


def test_queue_lengths_of_several_replicas_are_a_total_and_a_band(figures: list[Any], tmp_path: Path) -> None:
    samples = [[(0.0, 1), (1.0, 3), (2.5, 0)], [(0.0, 2), (2.0, 5), (3.0, 1)], [(0.5, 1), (3.0, 0)],
               [(0.0, 0), (1.5, 2), (3.0, 0)]]
    plots.plot_queue_lengths(tmp_path / "q.png", samples)
    top, band = figures[0].axes
    assert "4 replicas" in top.get_title()
    assert len(top.get_lines()) == 1 and len(band.get_lines()) == 1  # no line per replica
    assert band.collections  # the min-max band
    assert "(s)" in band.get_xlabel()
    for ax in (top, band):
        ticks = ax.get_yticks()
        assert all(float(t).is_integer() for t in ticks), ticks


def test_queue_grid_averages_each_replica_over_bins() -> None:
    t, counts, width = plots.queue_grid([[(0.0, 2), (5.0, 4), (10.0, 0)]], bins=2, per_bin=100)
    assert width == 5.0 and list(t) == [2.5, 7.5]
    assert counts.shape == (1, 2) and counts[0, 0] == pytest.approx(2) and counts[0, 1] == pytest.approx(4)


def test_sweep_plots_are_labelled_in_words_with_units(figures: list[Any], tmp_path: Path) -> None:
    plots.plot_sweep(tmp_path / "s.png", "workload.arrival.rate_per_s", [8, 16, 24],
                     {"dlora": [0.4, 0.45, None], "vllm": [0.5, 0.6, 0.7]}, "latency_per_token_s.mean")
    ax = figures[0].axes[0]
    assert ax.get_xlabel() == "arrival rate (req/s)"
    assert ax.get_ylabel() == "mean latency per output token (ms)"
    assert ax.get_title() == "mean latency per output token by arrival rate"
    assert max(max(line.get_ydata()) for line in ax.get_lines()) == pytest.approx(700)  # seconds -> ms
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "24"]
    plots.plot_sweep(tmp_path / "m.png", "adapters.count", [16, 32], {"a": [3, 7]}, "migrations")
    ax = figures[1].axes[0]
    assert ax.get_ylabel() == "migrations" and all(float(t).is_integer() for t in ax.get_yticks())
    plots.plot_sweep(tmp_path / "w.png", "stride (more skew ->)", ["1", "2"], {"a": [1.0, 2.0]}, "ratio x / y")
    assert figures[2].axes[0].get_xlabel() == "stride (more skew ->)"  # words are kept as given
