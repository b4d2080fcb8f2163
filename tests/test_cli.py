"""The CLI: simulate writes its outputs; bad input exits 2 with one line and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def dlora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dlora.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_simulate_writes_table_report_csv_and_plots(tmp_path):
    out = tmp_path / "qs"
    p = dlora("simulate", str(QUICKSTART), "--out", str(out), "--set", "workload.num_requests=200")
    assert p.returncode == 0, p.stderr
    assert "latency per output token" in p.stdout and "throughput" in p.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["completed"] == 200 and len(report["replicas"]) == 4
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == 201 and rows[0].startswith("id,adapter,replica,status,arrival_s")
    for png in ("latency_cdf.png", "queue_length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_scenario_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("rate_per_s: 6", "rate_per_s: -1"))
    p = dlora("simulate", str(bad))
    assert p.returncode == 2
    assert "workload.arrival.rate_per_s: must be > 0, got -1" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_missing_file_and_bad_yaml_and_bad_set(tmp_path):
    p = dlora("simulate", str(tmp_path / "nope.yaml"))
    assert p.returncode == 2 and "no such scenario file" in p.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("cluster: [1, 2\n")
    p = dlora("simulate", str(broken))
    assert p.returncode == 2 and "not valid YAML" in p.stderr and "Traceback" not in p.stderr
    p = dlora("simulate", str(QUICKSTART), "--set", "novalue")
    assert p.returncode == 2 and "expected key.path=value" in p.stderr
