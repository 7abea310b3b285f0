"""``kbus sweep`` on the command line: outputs, exit codes and errors that name the problem."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sweep_workloads import GATHER, write

from kbus.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_serial_sweep_writes_csv_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GATHER)
    out, report = tmp_path / "r.csv", tmp_path / "r.html"
    argv = ["sweep", str(path), "--config", "tiny", "--workers", "0", "--out", str(out), "--report", str(report)]
    argv += ["--set", "links.noc_hop.bandwidth=16GB/s,256GB/s", "--set", "topology.cubes_per_sip=1,2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sweep: 4 points, 0 failed" in printed and "best" in printed and "worst" in printed
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [(r["links.noc_hop.bandwidth"], r["topology.cubes_per_sip"]) for r in rows] == [
        ("16GB/s", "1"),
        ("16GB/s", "2"),
        ("256GB/s", "1"),
        ("256GB/s", "2"),
    ]
    assert all(int(r["virtual_time_ps"]) > 0 and r["error"] == "" for r in rows)
    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "virtual time vs topology.cubes_per_sip" in html


def test_zip_and_failed_points_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GATHER)
    argv = ["sweep", str(path), "--config", "tiny", "--workers", "0", "--zip"]
    argv += ["--set", "links.noc_hop.bandwidth=16GB/s,oops", "--set", "topology.cubes_per_sip=1,2"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "sweep: 2 points, 1 failed" in printed and "oops" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "topology.cubes_per_sip"], "expected KEY=V1,V2"),
        ([], "nothing to sweep"),
        (["--set", "a.b=1", "--set", "a.b=2"], "a.b is given twice"),
        (["--set", "a.b=1", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "--workers applies to the local"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    path = write(tmp_path, GATHER)
    assert main(["sweep", str(path), "--config", "tiny", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_recording_sweeps_from_its_own_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_sweep_points import record_run

    rec = tmp_path / "demo.kbrec"
    recorded_end = record_run(rec)
    out = tmp_path / "out.csv"
    args = ["sweep", str(rec), "--set", "links.host_pcie.bandwidth=1GB/s,32GB/s", "--workers", "0", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert [r["links.host_pcie.bandwidth"] for r in rows] == ["1GB/s", "32GB/s"]
    assert int(rows[1]["virtual_time_ps"]) == recorded_end < int(rows[0]["virtual_time_ps"])
    bad = tmp_path / "cut.kbrec"
    bad.write_bytes(b"")
    assert main(["sweep", str(bad), "--set", "topology.cubes_per_sip=1,2"]) == 2
    err = capsys.readouterr().err
    assert "cut.kbrec" in err and "not a kbus recording" in err


def test_the_readme_command_runs_on_a_local_cluster(tmp_path: Path) -> None:
    """The one-command local sweep, as a user runs it: a subprocess, two worker processes."""
    out = tmp_path / "results.csv"
    cmd = [sys.executable, "-m", "kbus", "sweep", "examples/60_sweep.py", "--config", "tiny", "--workers", "2"]
    cmd += ["--set", "links.noc_hop.bandwidth=16GB/s,256GB/s", "--set", "topology.cubes_per_sip=1,2", "--out", str(out)]
    env = {**os.environ, "COLUMNS": "160"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 4 and all(r["error"] == "" and int(r["metric.pes"]) > 0 for r in rows)
