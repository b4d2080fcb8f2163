"""What `dlora validate --against` shows and writes: the side-by-side table (80 columns),
validation.json, per_request.csv, validation.png (per-request latency scatter and TTFT CDFs),
and the simulator's usual report.json / requests.csv / plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ..labels import number, percent
from ..metrics import _clean
from ..output import write_outputs
from ..types import RequestStatus
from .against import METRICS, STATS, AgainstResult

LABELS = {"ttft_s": "TTFT", "tpot_s": "TPOT", "latency_s": "latency", "queueing_s": "queueing"}


def _num(v: float | None, scale: float = 1.0) -> str:
    """Four significant digits (162.5, 25.00, 2.105); a value that rounds to nothing at that
    scale (a float residue of 1e-12 ms) is 0."""
    if v is None:
        return "-"
    x = v * scale
    return "0" if abs(x) < 5e-4 else number(x, 4)


def _pct(v: float | None) -> str:
    return percent(v, signed=True)


def table(result: AgainstResult) -> Table:
    """Rows: mean / P50 / P90 of each metric (ms), throughput, per-request errors, the
    simulated run's preemptions and KV peak; columns real, simulated, error."""
    m = result.metrics
    t = Table(title=f"{result.run.caps.model}: real vs simulated ({Path(result.profile).name})",
              header_style="bold", caption="error = (simulated - real) / real; |Δ| rows: median over "
              "requests of |sim - real| (error: of |sim - real| / real)")
    t.add_column("metric", no_wrap=True)
    for col in ("real", "simulated", "error"):
        t.add_column(col, justify="right")
    for key in METRICS:
        for stat in STATS:
            p = m[key][stat]
            label = f"{LABELS[key]} {'mean' if stat == 'mean' else stat.upper()} (ms)"
            t.add_row(label, _num(p["real"], 1e3), _num(p["simulated"], 1e3), _pct(p["relative_error"]))
    p = m["throughput_rps"]
    t.add_row("throughput (req/s)", _num(p["real"]), _num(p["simulated"]), _pct(p["relative_error"]))
    pr = result.per_request
    for key in ("latency_s", "ttft_s"):
        e = pr[key]
        t.add_row(f"|Δ {LABELS[key]}| per req (ms)", "", _num(e["median_absolute_error"], 1e3),
                  percent(e["median_relative_error"]))
    s = result.simulated
    t.add_row("completed", str(len(result.run.requests)), str(s["completed"]), "")
    t.add_row("preemptions", "-", str(s["preemptions"]), "")
    frac = s["kv_peak_fraction"]
    t.add_row("KV peak (blocks)", "-", f"{s['kv_peak_blocks']}" + ("" if frac is None else f" ({frac * 100:.0f}%)"), "")
    return t


def write_all(out_dir: Path, result: AgainstResult) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "validation.json").write_text(
        json.dumps(_clean(result.as_dict()), indent=2, sort_keys=True) + "\n")
    write_per_request(out_dir / "per_request.csv", result)
    plot(out_dir / "validation.png", result)
    names = result.scenario.adapters.adapter_names()
    write_outputs(out_dir, result.report, result.sim.requests, names, result.sim.queue_samples)


def _rows(result: AgainstResult) -> list[dict[str, Any]]:
    rows = []
    for s in result.sim.requests:
        if s.id >= len(result.run.requests):
            continue
        a = result.run.requests[s.id]
        done = s.status == RequestStatus.FINISHED
        queue = None if s.first_scheduled_s is None else s.first_scheduled_s - s.arrival_s
        rows.append({
            "id": s.id, "request_id": a.request_id, "prompt_tokens": a.prompt_tokens,
            "output_tokens": a.output_tokens, "arrival_s": s.arrival_s,
            "real_ttft_s": a.ttft_s, "sim_ttft_s": s.ttft_s if done else None,
            "real_tpot_s": a.tpot_s, "sim_tpot_s": s.tpot_s if done else None,
            "real_latency_s": a.latency_s, "sim_latency_s": s.latency_s if done else None,
            "real_queueing_s": a.queueing_s, "sim_queueing_s": queue, "sim_preemptions": s.num_preemptions,
        })
    return rows


def write_per_request(path: Path, result: AgainstResult) -> None:
    rows = _rows(result)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        fields = list(rows[0]) if rows else ["id"]
        w.writerow(fields)
        for row in rows:
            w.writerow(["" if row[k] is None else (f"{row[k]:.9g}" if isinstance(row[k], float) else row[k])
                        for k in fields])


def plot(path: Path, result: AgainstResult) -> Path:
    from ..plots import _save, plt, use_log_axis

    rows = [r for r in _rows(result) if r["sim_latency_s"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    real = [r["real_latency_s"] for r in rows]
    sim = [r["sim_latency_s"] for r in rows]
    left.scatter(real, sim, s=8, alpha=0.6)
    top = max([*real, *sim, 1e-3])
    left.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle="--", label="simulated = real")
    left.set_xlabel("real latency (s)")
    left.set_ylabel("simulated latency (s)")
    left.set_title("per-request end-to-end latency")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for label, key in (("real", "real_ttft_s"), ("simulated", "sim_ttft_s")):
        vals = sorted(r[key] * 1e3 for r in rows if r[key] is not None)
        if vals:  # the empirical CDF: a step at each request
            right.step([vals[0], *vals], [0.0, *((i + 1) / len(vals) for i in range(len(vals)))],
                       where="post", label=f"{label} ({len(vals):,} requests)")
    if use_log_axis([r[k] * 1e3 for r in rows for k in ("real_ttft_s", "sim_ttft_s") if r[k] is not None]):
        right.set_xscale("log")
    right.set_ylim(0, 1.02)
    right.set_xlabel("TTFT (ms)")
    right.set_ylabel("fraction of requests (CDF)")
    right.set_title("time to first token")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(f"{result.run.caps.model}: simulated vs real ({Path(result.profile).name})", fontsize=10)
    return _save(fig, path)
