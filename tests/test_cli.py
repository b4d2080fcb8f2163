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


# ---- bad input families (issue 13): exit 2, one line, before any work ----


def cli(*args: str):  # in process (faster than a subprocess); stderr kept apart
    from typer.testing import CliRunner

    from dlora.cli import app

    return CliRunner().invoke(app, list(args))


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_out_naming_a_file_fails_before_any_work(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    q = str(QUICKSTART)
    commands = [["simulate", q], ["run", q], ["validate", q], ["capacity", q],
                ["plan", q, "--target-rate", "5"], ["reproduce", "--quick"]]
    for args in commands:
        for target, says in ((taken, "not a folder;"), (taken / "sub", f"not a folder ({taken} is a file)")):
            line = one_error_line(cli(*args, "--out", str(target)))
            assert f"--out {target}: {says}" in line, (args, line)
    assert taken.read_text() == "keep me"


def test_error_text_in_brackets_is_printed_as_written():
    bad = "workload.lengths={kind: uniform, prompt_range: [5, 1], output_range: [1, 2]}"
    line = one_error_line(cli("simulate", str(QUICKSTART), "--set", bad))
    assert line.endswith("prompt_range: must be [low, high] with low <= high, got [5, 1]")


def test_bad_inputs_each_give_one_line(tmp_path):
    q = str(QUICKSTART)
    cases = [
        (["--set", "workload.arrival.rate_per_s=.inf"], "workload.arrival.rate_per_s: must be a finite number"),
        (["--set", "adapters.ranks=[100000]"], "adapters.ranks[0]: rank 100000 makes adapters of"),
        (["--set", "cluster={replicas: 1, replicas: 2}"], "duplicate key 'replicas'"),
    ]
    for extra, message in cases:
        assert message in one_error_line(cli("simulate", q, *extra)), extra
    (tmp_path / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\nnan,3,3\n")
    trace = [f"workload.arrival={{kind: trace, path: {tmp_path / 't.csv'}}}", "workload.lengths={}",
             "workload.num_requests=null"]
    line = one_error_line(cli("simulate", q, *(a for s in trace for a in ("--set", s))))
    assert "workload.arrival.path:" in line and "t.csv, line 3: arrival_s must be a finite number" in line
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000)
    assert "YAML nested too deeply" in one_error_line(cli("simulate", str(tmp_path / "deep.yaml")))
    (tmp_path / "latin1.yaml").write_bytes(QUICKSTART.read_bytes().replace(b"quickstart\n", b"caf\xe9\n"))
    assert "not UTF-8 text" in one_error_line(cli("simulate", str(tmp_path / "latin1.yaml")))


def test_plots_of_a_run_with_every_request_rejected_print_no_warnings(tmp_path):
    p = dlora("simulate", str(QUICKSTART), "-q", "--out", str(tmp_path / "o"), "--set", "workload.num_requests=20",
              "--set", "cluster.memory_fraction=0.0016")  # room for the adapter, not for a request
    assert p.returncode == 0, p.stderr
    assert "Warning" not in p.stderr and "legend" not in p.stderr, p.stderr
    assert (tmp_path / "o" / "latency_cdf.png").is_file()
