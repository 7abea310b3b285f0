"""Sweeps on Dask: the same table as a serial run, on a fresh local cluster and after a worker is killed.

The clusters here are started by the tests themselves (two worker processes),
and the only process a test kills is one of those workers.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sweep_workloads import EMPTY, GATHER, KILLS_ITS_WORKER, SLOW, slow_with_marker, write

from kbus.sweep import PointResult, sweep
from kbus.sweep.runner import LOCAL_SCHEDULER_OPTIONS, batch_size

distributed = pytest.importorskip("distributed")


@pytest.fixture
def client() -> Iterator[Any]:
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs=dict(LOCAL_SCHEDULER_OPTIONS),
        silence_logs=logging.ERROR,
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_local_cluster_gives_the_serial_table_errors_included(tmp_path: Path) -> None:
    path = write(tmp_path, GATHER)
    grid = {"links.noc_hop.bandwidth": ["16GB/s", "bad", "256GB/s"], "topology.cubes_per_sip": [1, 2]}
    serial = sweep(path, grid, base="tiny", workers=0)
    seen: list[tuple[int, int, int]] = []
    parallel = sweep(
        path, grid, base="tiny", workers=2, on_result=lambda r, done, total: seen.append((r.index, done, total))
    )
    assert len(parallel) == 6 and [r.index for r in parallel] == list(range(6))
    assert list(parallel) == list(serial)
    assert [r.virtual_time_ps for r in parallel] == [r.virtual_time_ps for r in serial]
    assert len(parallel.failed) == 2 and all("links.noc_hop.bandwidth" in (r.error or "") for r in parallel.failed)
    # on_result saw every point once, counting up to the total.
    assert sorted(i for i, _, _ in seen) == list(range(6))
    assert [d for _, d, _ in seen] == list(range(1, 7)) and {t for _, _, t in seen} == {6}


def test_a_killed_worker_loses_nothing(tmp_path: Path, client: Any) -> None:
    path = write(tmp_path, SLOW)
    grid = {"topology.cubes_per_sip": [1, 2, 3, 4], "links.noc_hop.bandwidth": ["32GB/s", "128GB/s"]}
    killed: list[tuple[str, int, tuple[str, ...]]] = []

    def kill_a_busy_worker(result: PointResult, done: int, total: int) -> None:
        if killed:
            return
        processing = client.processing()
        busy = [addr for addr, keys in processing.items() if keys]
        assert busy, f"no worker was running a point after the first result: {processing}"
        pids = client.run(os.getpid)
        victim = busy[0]
        os.kill(pids[victim], signal.SIGKILL)
        killed.append((victim, pids[victim], tuple(processing[victim])))

    parallel = sweep(path, grid, base="tiny", client=client, on_result=kill_a_busy_worker)
    assert killed, "the worker was never killed"
    victim, pid, in_flight = killed[0]
    assert in_flight, f"the killed worker {victim} had no point in flight"
    serial = sweep(path, grid, base="tiny", workers=0)
    assert len(parallel) == len(serial) == 8
    assert not parallel.failed, [r.error for r in parallel.failed]
    assert list(parallel) == list(serial)
    # The cluster noticed: the killed process is gone from the workers' pids.
    assert pid not in client.run(os.getpid).values()


def test_cli_submits_to_an_existing_scheduler(tmp_path: Path, client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from kbus.cli import main

    path = write(tmp_path, GATHER)
    sets = ["--set", "links.noc_hop.bandwidth=16GB/s,256GB/s", "--set", "topology.cubes_per_sip=1,2"]
    remote, local = tmp_path / "remote.csv", tmp_path / "serial.csv"
    address = client.scheduler.address
    assert main(["sweep", str(path), "--config", "tiny", "--scheduler", address, "--out", str(remote), *sets]) == 0
    assert main(["sweep", str(path), "--config", "tiny", "--workers", "0", "--out", str(local), *sets]) == 0
    capsys.readouterr()

    def table(p: Path) -> list[str]:  # every column but wall time
        lines = p.read_text(encoding="utf-8").splitlines()
        wall = lines[0].split(",").index("wall_s")
        return [",".join(c for i, c in enumerate(line.split(",")) if i != wall) for line in lines]

    assert table(remote) == table(local) and len(table(remote)) == 5


def test_batched_points_give_the_serial_table(tmp_path: Path, client: Any) -> None:
    path = write(tmp_path, EMPTY)
    grid = {"links.noc_pe.latency": [f"{i}ps" for i in range(1, 71)], "topology.cubes_per_sip": [1]}
    assert batch_size(70, 2) == 2  # so this sweep really runs several points per task
    parallel = sweep(path, grid, base="tiny", client=client)
    serial = sweep(path, grid, base="tiny", workers=0)
    assert len(parallel) == 70 and list(parallel) == list(serial) and not parallel.failed


def test_a_point_that_always_kills_its_worker_is_recorded_not_lost(tmp_path: Path) -> None:
    import dask

    path = write(tmp_path, KILLS_ITS_WORKER)
    # Give up after the first death rather than Dask's default three, to keep the test short.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        results = sweep(path, {"topology.cubes_per_sip": [1, 2, 3]}, base="tiny", workers=2)
    assert [r.index for r in results] == [0, 1, 2]
    assert results[0].ok and results[2].ok
    err = results[1].error or ""
    assert "dask could not run" in err and "point 1" in err and "topology.cubes_per_sip=2" in err
    assert "KilledWorker" in err and str(path) in err


def test_interrupt_cancels_the_remaining_points_and_keeps_the_finished(tmp_path: Path, client: Any) -> None:
    from kbus.sweep import SweepInterrupted

    path = write(tmp_path, SLOW)
    grid = {"topology.cubes_per_sip": list(range(1, 13))}

    def interrupt_after_two(result: PointResult, done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted) as info:
        sweep(path, grid, base="tiny", client=client, on_result=interrupt_after_two)
    stop = info.value
    assert len(stop.results) == 2 and stop.cancelled == 10 and all(r.ok for r in stop.results)
    # Nothing of the sweep is left on the cluster: its tasks were cancelled, not left running.
    deadline = time.monotonic() + 30
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(client.processing().values()), client.processing()


def test_ctrl_c_on_the_command_line_exits_130_and_writes_what_finished(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it."""
    markers = tmp_path / "started"
    markers.mkdir()
    path = write(tmp_path, slow_with_marker(str(markers)))
    out = tmp_path / "partial.csv"
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "kbus", "sweep", str(path), "--config", "tiny", "--workers", "2", "--out", str(out)]
    cmd += ["--set", "topology.cubes_per_sip=" + ",".join(str(i) for i in range(1, 41))]
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        # Five points started on two one-thread workers: at least three finished, the first of them
        # a whole point (0.4 s) ago, so its result has reached the submitting process.
        while len(list(markers.iterdir())) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted:" in stdout and "points cancelled" in stdout, stdout
    assert "Traceback" not in stderr, stderr
    rows = out.read_text(encoding="utf-8").splitlines()
    assert 1 <= len(rows) - 1 < 40  # the header, then only the points that finished
