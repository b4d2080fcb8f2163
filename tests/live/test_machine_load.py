"""The busy-machine check behind `dlora validate`'s warning: other processes' CPU time and
steal from /proc/stat, and the warning's thresholds."""

from __future__ import annotations

import os
from pathlib import Path

from dlora.live import machine_load
from dlora.live.machine_load import CpuSample, busy_warning, other_load


def test_other_load_subtracts_our_own_cpu_time():
    before = CpuSample(wall_s=0.0, own_cpu_s=1.0, busy_s=10.0, steal_s=0.0, cpus=2)
    after = CpuSample(wall_s=10.0, own_cpu_s=6.0, busy_s=25.0, steal_s=1.0, cpus=2)
    load = other_load(before, after)  # 20 CPU-seconds: 15 busy, 5 of them ours, 1 stolen
    assert load["cpus"] == 2
    assert abs(load["other_cpu_share"] - 0.5) < 1e-12
    assert abs(load["own_cpu_share"] - 0.25) < 1e-12 and abs(load["steal_share"] - 0.05) < 1e-12
    assert other_load(None, after) == {} and other_load(after, after) == {}  # nothing to say


def test_the_warning_names_the_share_and_says_what_to_do():
    assert busy_warning({"cpus": 2, "other_cpu_share": 0.1, "steal_share": 0.0}) is None
    assert busy_warning({}) is None
    text = busy_warning({"cpus": 2, "other_cpu_share": 0.95, "steal_share": 0.0}, "the live values",
                        "rerun on an idle machine")
    assert text is not None and text.startswith("warning: the machine was busy during the live run")
    assert "other processes used 95% of its 2 CPUs" in text and "rerun on an idle machine" in text
    stolen = busy_warning({"cpus": 4, "other_cpu_share": 0.0, "steal_share": 0.3})
    assert stolen is not None and "the hypervisor stole 30%" in stolen


def test_sample_reads_the_cpus_this_process_may_use(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(machine_load, "_our_cpus", lambda: {0, 1})
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 300 5000 0 0 0 0 0 0\n"
                    "cpu0 100 0 50 2000 0 0 0 10 0 0\n"
                    "cpu1 200 0 50 2000 0 5 5 0 0 0\n"
                    "cpu2 600 0 200 1000 0 0 0 0 0 0\n"
                    "intr 12345\n")
    s = machine_load.sample(stat)
    tick = os.sysconf("SC_CLK_TCK")
    assert s is not None and s.cpus == 2
    assert abs(s.busy_s - 410 / tick) < 1e-9 and abs(s.steal_s - 10 / tick) < 1e-9
    assert machine_load.sample(tmp_path / "missing") is None
