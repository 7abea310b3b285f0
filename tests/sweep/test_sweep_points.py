"""One point at a time, in this process: records, determinism, and every error naming what and where."""

from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from sweep_workloads import FAILS_ON_FOUR_CUBES, GATHER, write

import kbus
from kbus.hw import DeviceConfig
from kbus.sweep import (
    PointResult,
    PythonWorkload,
    RecordingWorkload,
    SweepResults,
    WorkloadError,
    load_workload,
    run_point,
    sweep,
    utilisation_peaks,
)

GRID = {"links.noc_hop.bandwidth": ["16GB/s", "256GB/s"], "topology.cubes_per_sip": [1, 2]}


def test_a_point_records_time_utilisation_and_metrics(tmp_path: Path) -> None:
    wl = load_workload(write(tmp_path, GATHER))
    base = DeviceConfig.load("tiny")
    r = run_point(wl, base, 3, {"topology.cubes_per_sip": 2})
    assert r.ok, r.error
    assert r.index == 3 and r.values == {"topology.cubes_per_sip": 2}
    assert r.virtual_time_ps is not None and r.virtual_time_ps > 0
    assert r.metrics == {"checksum": float((_host() * 2 + 1).sum()), "pes": 8, "np_scalar": 7}
    assert type(r.metrics["np_scalar"]) is int  # numpy scalars become plain values
    # Every link level and block kind of the device shows up, each a fraction.
    assert {"link.noc_hop", "link.host_pcie", "block.PCIE_EP", "block.PE_DMA"} <= set(r.utilisation)
    assert all(0.0 <= u <= 1.0 for u in r.utilisation.values()), r.utilisation
    assert r.utilisation["link.noc_hop"] > 0  # the gather crossed the NoC between the two cubes
    # Per-kind request latencies: the workload wrote, launched kernels and read back.
    kinds = {k.rsplit(".", 1)[0] for k in r.latency}
    assert {"memory_write", "kernel_launch", "memory_read"} <= kinds, r.latency
    for kind in kinds:
        count, total = r.latency[f"{kind}.count"], r.latency[f"{kind}.total_ps"]
        p50, p99 = r.latency[f"{kind}.p50_ps"], r.latency[f"{kind}.p99_ps"]
        assert count >= 1 and 0 < p50 <= p99 <= total, (kind, r.latency)
    assert r.wall_s > 0


def _host() -> Any:
    return np.arange(64 * 256, dtype=np.float32).reshape(64, 256)


def test_the_same_point_gives_the_same_record_twice_and_the_config_matters(tmp_path: Path) -> None:
    wl = load_workload(write(tmp_path, GATHER))
    base = DeviceConfig.load("tiny")
    a = run_point(wl, base, 0, {"links.noc_hop.bandwidth": "16GB/s"})
    b = run_point(wl, base, 0, {"links.noc_hop.bandwidth": "16GB/s"})
    c = run_point(wl, base, 0, {"links.noc_hop.bandwidth": "256GB/s"})
    assert a == b and a.virtual_time_ps == b.virtual_time_ps
    assert c.virtual_time_ps != a.virtual_time_ps  # a slower NoC hop shows in the end-to-end time


def test_wall_time_is_not_part_of_equality() -> None:
    a = PointResult(0, {"k.x": 1}, 5, {}, {}, {}, None, wall_s=1.0)
    assert a == attrs.evolve(a, wall_s=2.0)
    assert a != attrs.evolve(a, virtual_time_ps=6)


def test_invalid_config_is_recorded_with_key_value_and_point_and_the_sweep_goes_on(tmp_path: Path) -> None:
    path = write(tmp_path, GATHER)
    results = sweep(
        path,
        {"links.noc_hop.bandwidth": ["64GB/s", "fast"], "topology.cubes_per_sip": [2, "two"]},
        base="tiny",
        workers=0,
    )
    assert len(results) == 4
    by_values = {tuple(r.values.values()): r for r in results}
    assert by_values[("64GB/s", 2)].ok
    bad_bw = by_values[("fast", 2)].error or ""
    assert "invalid config at point 2" in bad_bw and "links.noc_hop.bandwidth" in bad_bw and "'fast'" in bad_bw
    bad_count = by_values[("64GB/s", "two")].error or ""
    assert "topology.cubes_per_sip" in bad_count and "'two'" in bad_count
    assert len(results.failed) == 3
    assert all(r.virtual_time_ps is None for r in results.failed)


def test_a_failing_run_names_the_workload_file_line_and_point(tmp_path: Path) -> None:
    path = write(tmp_path, FAILS_ON_FOUR_CUBES, "fussy.py")
    results = sweep(path, {"topology.cubes_per_sip": [2, 4, 1]}, base="tiny", workers=0)
    assert [r.ok for r in results] == [True, False, True]
    err = results[1].error or ""
    assert str(path) in err and "point 1" in err and "topology.cubes_per_sip=4" in err
    line = (
        FAILS_ON_FOUR_CUBES.splitlines().index(
            '        raise RuntimeError("four cubes are not supported by this workload")'
        )
        + 1
    )
    assert "RuntimeError: four cubes are not supported" in err and f"fussy.py line {line}, in workload" in err


@pytest.mark.parametrize(
    ("returned", "match"),
    [("[1, 2]", "returned a list; expected a dict"), ("{'m': [1]}", "metric 'm' = list"), ("{3: 1}", "metric named 3")],
)
def test_bad_metrics_are_a_point_error(tmp_path: Path, returned: str, match: str) -> None:
    path = write(tmp_path, f"async def workload(torch):\n    return {returned}\n")
    [r] = sweep(path, {"topology.cubes_per_sip": [1]}, base="tiny", workers=0)
    assert r.error is not None and match in r.error and str(path) in r.error


def record_run(path: Path) -> int:
    """Record a small tensor program on ``tiny``; return the recorded end-to-end time (last response)."""

    async def main() -> None:
        async with kbus.open_device("tiny", record=path) as torch:
            x = torch.tensor(np.arange(64 * 1024, dtype=np.float32), policy=kbus.Shard(dim=0))
            y = x * 2.0 + 1.0
            assert np.array_equal(await y.numpy(), np.arange(64 * 1024, dtype=np.float32) * 2 + 1)

    kbus.run(main)
    from kbus.remote import read_recording

    return max(int(r["t"]) for r in read_recording(path).records if r["k"] == "resp")


def test_a_recording_replays_at_every_point_from_its_own_config(tmp_path: Path) -> None:
    rec = tmp_path / "run.kbrec"
    recorded_end = record_run(rec)
    wl = load_workload(rec)
    assert isinstance(wl, RecordingWorkload)
    assert wl.default_base() == DeviceConfig.load("tiny")  # the grid starts from the recorded device
    # On its own config the replay ends exactly when the recording did.
    same = run_point(wl, DeviceConfig.load("tiny"), 0, {})
    assert same.ok, same.error
    assert same.virtual_time_ps == recorded_end == same.metrics["recorded_end_ps"]
    assert same.metrics["failed_requests"] == 0 and int(same.metrics["requests"] or 0) > 3
    assert same.latency["memory_write.count"] >= 1 and same.latency["memory_write.p99_ps"] > 0
    assert {"link.noc_hop", "block.PE_DMA"} <= set(same.utilisation)
    # Workers get the workload pickled: the recording travels whole and replays the same there.
    shipped = pickle.loads(pickle.dumps(wl))
    assert run_point(shipped, DeviceConfig.load("tiny"), 0, {}).virtual_time_ps == recorded_end
    # A sweep without a base config starts from the recording's: a slower PCIe bus only slows it down.
    results = sweep(rec, {"links.host_pcie.bandwidth": ["1GB/s", "32GB/s"]}, workers=0)
    slow, fast = results
    assert slow.ok and fast.ok, (slow.error, fast.error)
    assert slow.virtual_time_ps is not None and fast.virtual_time_ps is not None
    assert slow.virtual_time_ps > fast.virtual_time_ps
    assert fast.virtual_time_ps == recorded_end  # 32 GB/s is tiny's own PCIe: the recorded run again


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"bad\.kbrec.*empty or not a kbus recording"),
        (b"\x93\x01\x02\x03", r"bad\.kbrec.*not a kbus recording"),
    ],
)
def test_an_unusable_recording_is_refused_before_any_point(tmp_path: Path, content: bytes, match: str) -> None:
    rec = tmp_path / "bad.kbrec"
    rec.write_bytes(content)
    with pytest.raises(WorkloadError, match=match):
        load_workload(rec)
    with pytest.raises(WorkloadError, match=match):
        sweep(rec, {"topology.cubes_per_sip": [1]}, base="tiny", workers=0)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("w.txt", "", r"w\.txt.*unknown kind '\.txt'"),
        ("w.py", "def workload(torch):\n    return {}\n", r"w\.py.*is a function, not an async function"),
        ("w.py", "x = 1\n", r"w\.py.*`async def workload\(torch\) -> dict` is missing"),
        ("w.py", "async def workload(torch)\n", r"w\.py: syntax error at line 1"),
        ("w.py", "raise ValueError('no config here')\n", r"w\.py: running the file failed: ValueError: no config here"),
    ],
)
def test_unusable_workload_files_fail_before_any_point(tmp_path: Path, name: str, text: str, match: str) -> None:
    path = write(tmp_path, text, name)
    with pytest.raises(WorkloadError, match=match) as info:
        sweep(path, {"topology.cubes_per_sip": [1]}, base="tiny", workers=0)
    assert info.value.path == str(path)


def test_a_missing_workload_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"nope\.py.*cannot read it"):
        load_workload(tmp_path / "nope.py")


def test_csv_has_one_row_per_point_with_every_column(tmp_path: Path) -> None:
    path = write(tmp_path, GATHER)
    results = sweep(path, {**GRID, "links.noc_pe.latency": ["5ns", "bogus"]}, base="tiny", workers=0)
    out = tmp_path / "r.csv"
    text = results.to_csv(out)
    assert out.read_text(encoding="utf-8") == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 8
    cols = list(rows[0])
    assert cols[:4] == ["index", "links.noc_hop.bandwidth", "topology.cubes_per_sip", "links.noc_pe.latency"]
    assert {"virtual_time_ps", "metric.checksum", "util.link.noc_hop", "latency.memory_read.p99_ps"} <= set(cols)
    assert cols[-2:] == ["wall_s", "error"]
    for row, r in zip(rows, results, strict=True):
        assert row["index"] == str(r.index)
        assert row["virtual_time_ps"] == ("" if r.virtual_time_ps is None else str(r.virtual_time_ps))
        assert row["error"] == (r.error or "")
    assert sum(1 for row in rows if row["error"]) == 4


def test_to_pandas_has_the_same_table(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    results = sweep(write(tmp_path, GATHER), GRID, base="tiny", workers=0)
    df = results.to_pandas()
    assert list(df.columns) == results.columns()
    assert len(df) == 4
    assert list(df["virtual_time_ps"]) == [r.virtual_time_ps for r in results]


def test_best_and_worst() -> None:
    rs = SweepResults(
        ("k.x",),
        (
            PointResult(0, {"k.x": 1}, 30),
            PointResult(1, {"k.x": 2}, 10),
            PointResult(2, {"k.x": 3}, None, error="boom"),
            PointResult(3, {"k.x": 4}, 10),
            PointResult(4, {"k.x": 5}, 40),
        ),
    )
    assert rs.best() is rs[1] and rs.worst() is rs[4] and rs.failed == (rs[2],)


def test_latency_percentiles_are_nearest_rank() -> None:
    from kbus.sweep import RequestLatencies

    rec = RequestLatencies()
    for i, t in enumerate([40, 10, 30, 20]):
        msg = type("Msg", (), {"msg_type": "memory_read", "correlation_id": "c", "request_id": str(i)})()
        rec.on_request("begin", msg, None, 100)
        rec.on_request("end", msg, (), 100 + t)
    assert rec.summary() == {
        "memory_read.count": 4,
        "memory_read.total_ps": 100,
        "memory_read.p50_ps": 20,
        "memory_read.p99_ps": 40,
    }


def test_utilisation_is_read_generically_and_tolerates_new_keys() -> None:
    @attrs.frozen
    class Block:
        kind: str
        utilisation: float
        new_counter: int = 3

    class Device:
        def level_stats(self) -> dict[str, dict[str, float]]:
            return {
                "noc_hop": {"links": 2, "utilisation": 0.25, "bytes": 10},
                "hbm": {"channels": 4, "utilisation": 0.5, "channel_utilisation_max": 0.75},
            }

        def stats(self) -> dict[str, Block]:
            return {"a": Block("PE_DMA", 0.1), "b": Block("PE_DMA", 0.3), "c": Block("HBM", 0.2)}

    assert utilisation_peaks(Device()) == {
        "block.HBM": 0.2,
        "block.PE_DMA": 0.3,
        "link.hbm": 0.5,
        "link.hbm.channel_utilisation_max": 0.75,
        "link.noc_hop": 0.25,
    }


def test_a_workload_object_is_accepted_and_exported_from_kbus(tmp_path: Path) -> None:
    wl = PythonWorkload(GATHER, name="inline.py")
    results = kbus.sweep(wl, {"topology.cubes_per_sip": [1]}, base="tiny", workers=0)
    assert results[0].ok and results[0].metrics["pes"] == 4


def test_workers_and_a_client_together_are_refused(tmp_path: Path) -> None:
    from kbus import SweepError

    with pytest.raises(SweepError, match="workers=2 applies to a local cluster"):
        sweep(write(tmp_path, GATHER), GRID, base="tiny", client=object(), workers=2)  # type: ignore[arg-type]


def test_sweep_exceptions_are_exported_from_kbus() -> None:
    assert issubclass(kbus.WorkloadError, kbus.SweepError) and issubclass(kbus.SweepError, kbus.KbusError)
    assert issubclass(kbus.SweepInterrupted, KeyboardInterrupt)


def test_report_edge_cases_one_key_and_all_failed(tmp_path: Path) -> None:
    from kbus.sweep import write_report

    one = sweep(write(tmp_path, GATHER), {"topology.cubes_per_sip": [1, 2]}, base="tiny", workers=0)
    write_report(one, tmp_path / "one.html")
    page = (tmp_path / "one.html").read_text(encoding="utf-8")
    assert 'id="time-vs-topology.cubes_per_sip"' in page and 'id="utilisation"' in page
    assert page.count("<tr>") + page.count('<tr class="failed">') == 3  # header + 2 points

    bad = sweep(write(tmp_path, GATHER), {"topology.cubes_per_sip": ["x", "y"]}, base="tiny", workers=0)
    write_report(bad, tmp_path / "bad.html")
    page = (tmp_path / "bad.html").read_text(encoding="utf-8")
    assert "2 points, 2 failed" in page and 'id="utilisation"' not in page
    assert page.count('<tr class="failed">') == 2 and "topology.cubes_per_sip: expected an integer" in page
