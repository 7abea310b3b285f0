"""FileSink: valid Chrome trace-event JSON, incremental, deterministic across event loops."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import uvloop
from conftest import ListSink
from workloads import device_config, make_device, make_request, run_workload, runtime_workload

import kbus
from kbus import Block, Link, Sim, ns
from kbus.trace import FileSink, TraceError, Tracer, record

# ------------------------------------------------------------------ validator
PHASES = set("XBEbenIiCMstfPOND")
METADATA = {"process_name", "thread_name", "process_sort_index", "thread_sort_index", "process_labels"}


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ps(us: float) -> int:
    """Microseconds (the format's unit) back to integer picoseconds, exactly as written."""
    return int((Decimal(repr(us)) * 1_000_000).to_integral_value())


def validate_trace(doc: object) -> dict[str, int]:
    """Check ``doc`` against the trace-event format; return counts per phase.

    Raises AssertionError naming the first offending event. Checks: the
    container; required keys and types per phase; X durations >= 0; B/E and b/e
    balance; flow ids paired (v1 s/f and v2 bind_id flow_out/flow_in); slices on
    one (pid, tid) nest (no partial overlap).
    """
    assert isinstance(doc, dict), f"top level must be an object, got {type(doc).__name__}"
    events = doc.get("traceEvents")
    assert isinstance(events, list), "traceEvents must be an array"
    if "otherData" in doc:
        assert isinstance(doc["otherData"], dict), "otherData must be an object"
    counts: dict[str, int] = defaultdict(int)
    slices: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
    open_b: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    open_async: dict[tuple[str, object, str], int] = defaultdict(int)
    flow_v1: dict[object, list[str]] = defaultdict(list)
    flow_out: dict[int, int] = defaultdict(int)
    flow_in: dict[int, int] = defaultdict(int)
    for i, ev in enumerate(events):
        where = f"traceEvents[{i}] {ev!r:.200}"
        assert isinstance(ev, dict), f"{where}: an event must be an object"
        ph = ev.get("ph")
        assert isinstance(ph, str) and ph in PHASES, f"{where}: bad ph {ph!r}"
        counts[ph] += 1
        assert isinstance(ev.get("name"), str), f"{where}: name must be a string"
        assert _int(ev.get("pid")), f"{where}: pid must be an int"
        assert _int(ev.get("tid")), f"{where}: tid must be an int"
        if "args" in ev:
            assert isinstance(ev["args"], dict), f"{where}: args must be an object"
        for key in ev:
            assert not isinstance(ev[key], list), f"{where}: top-level array value {key!r} (Perfetto rejects it)"
        if ph == "M":
            assert ev["name"] in METADATA, f"{where}: unknown metadata {ev['name']!r}"
            args = ev.get("args")
            assert isinstance(args, dict), f"{where}: metadata needs args"
            if ev["name"].endswith("_name"):
                assert isinstance(args.get("name"), str), f"{where}: args.name must be a string"
            if ev["name"].endswith("_sort_index"):
                assert _int(args.get("sort_index")), f"{where}: args.sort_index must be an int"
            continue
        assert _num(ev.get("ts")), f"{where}: ts must be a number"
        ts = _ps(ev["ts"])
        track = (ev["pid"], ev["tid"])
        if ph == "X":
            assert _num(ev.get("dur")) and ev["dur"] >= 0, f"{where}: X needs dur >= 0"
            slices[track].append((ts, ts + _ps(ev["dur"]), where))
        elif ph == "B":
            open_b[track].append((ev["name"], ts))
        elif ph == "E":
            assert open_b[track], f"{where}: E without B on {track}"
            _name, start = open_b[track].pop()
            assert ts >= start, f"{where}: E before its B"
            slices[track].append((start, ts, where))
        elif ph in "be":
            assert "id" in ev or "id2" in ev, f"{where}: async events need an id"
            assert isinstance(ev.get("cat"), str), f"{where}: async events need a cat"
            key = (ev["cat"], ev.get("id", ev.get("id2")), ev["name"])
            open_async[key] += 1 if ph == "b" else -1
            assert open_async[key] >= 0, f"{where}: e without b"
        elif ph == "C":
            args = ev.get("args")
            assert isinstance(args, dict) and args, f"{where}: counter needs args"
            assert all(_num(v) for v in args.values()), f"{where}: counter values must be numbers"
        elif ph in "iI":
            assert ev.get("s", "t") in ("g", "p", "t"), f"{where}: bad instant scope"
        elif ph in "stf":
            assert "id" in ev, f"{where}: flow events need an id"
            flow_v1[(ev.get("cat"), ev["id"])].append(ph)
        if "bind_id" in ev:
            assert ph in "XB", f"{where}: bind_id on a {ph} event"
            assert _int(ev["bind_id"]), f"{where}: bind_id must be an int"
            assert ev.get("flow_in") or ev.get("flow_out"), f"{where}: bind_id without flow_in/flow_out"
            if ev.get("flow_out"):
                flow_out[ev["bind_id"]] += 1
            if ev.get("flow_in"):
                flow_in[ev["bind_id"]] += 1
    for track, unclosed in open_b.items():
        assert not unclosed, f"unclosed B events on {track}: {unclosed}"
    for key, n in open_async.items():
        assert n == 0, f"unbalanced async events {key}"
    for key, phs in flow_v1.items():
        assert phs.count("s") == 1 and phs.count("f") == 1, f"flow {key} not paired: {phs}"
    for fid, n in flow_out.items():
        assert n == 1, f"flow bind_id {fid} starts {n} times"
    for fid in flow_in:
        assert flow_out.get(fid) == 1, f"flow bind_id {fid} ends but never starts"
    for track, spans in slices.items():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple[int, int, str]] = []
        for start, end, where in spans:
            while stack and stack[-1][1] <= start:
                stack.pop()
            if stack:
                assert end <= stack[-1][1], f"partial overlap on {track}: {where} vs {stack[-1][2]}"
            stack.append((start, end, where))
    counts["flows"] = sum(flow_in.values())
    return dict(counts)


def test_validator_catches_what_it_should() -> None:
    ok = {"name": "a", "ph": "X", "ts": 0.0, "dur": 1.0, "pid": 1, "tid": 1}
    validate_trace({"traceEvents": [ok, {**ok, "ts": 0.25, "dur": 0.5}, {**ok, "ts": 1.0}]})
    bad = [
        ({**ok, "dur": -1}, "dur >= 0"),
        ({**ok, "ph": "Q"}, "bad ph"),
        ({**ok, "pid": "1"}, "pid must be an int"),
        ({**ok, "ts": "0"}, "ts must be a number"),
        ({**ok, "ph": "E"}, "E without B"),
        ({**ok, "bind_id": 4, "flow_in": True}, "never starts"),
        ({**ok, "ts": 0.5}, "partial overlap"),
    ]
    for extra, message in bad:
        with pytest.raises(AssertionError, match=message):
            validate_trace({"traceEvents": [ok, extra]})
    with pytest.raises(AssertionError, match="unclosed B"):
        validate_trace({"traceEvents": [{**ok, "ph": "B"}]})


# ---------------------------------------------------------------------- tests
def load(path: Path) -> dict[str, Any]:
    doc = orjson.loads(path.read_bytes())
    assert isinstance(doc, dict)
    return doc


async def traced_workload(path: Path, requests: int = 60, sink: Any = None, runtime: bool = True, **kw: Any) -> None:
    """Tensors and a kernel through the runtime, then ``requests`` raw requests, on a 2-SIP device.

    ``runtime=False``: the raw requests only.
    """
    if not runtime:
        dev = make_device(sips=2)
        with record(dev, path, **kw):
            await run_workload(dev, requests=requests, window=8)
        await dev.aclose()
        return
    async with kbus.open_device(device_config(sips=2)) as torch:
        with record(torch.device, path, **kw) as tracer:
            if sink is not None:
                tracer.add_sink(sink)
            await runtime_workload(torch)
            await run_workload(torch.device, requests=requests, window=8, first=16, maps=False)


@pytest.mark.asyncio
async def test_workload_trace_is_valid_and_complete(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    seen = ListSink()
    await traced_workload(path, sink=seen)
    doc = load(path)
    counts = validate_trace(doc)
    assert counts["X"] > 500 and counts["C"] > 10 and counts["i"] > 10
    assert counts["flows"] >= 60  # at least one arrow per request, from it to its responses
    events = doc["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert procs == {1: "host", 2: "sip0 (tiny)", 3: "sip1 (tiny)"}
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert "sip0.cube1.pe0.dma (PE_DMA)" in threads.values()
    assert "host->sip1.pcie_ep" in threads.values()
    assert "requests" in threads.values()
    assert any(name.endswith(" #2") for name in threads.values())  # overlapping spans got a lane
    cats = {e.get("cat") for e in events}
    assert {"link", "busy", "request", "kernel", "mem", "depth"} <= cats
    other = doc["otherData"]
    assert other["device"] == "tiny" and other["events"] == len(events)
    # Spans carry virtual time exactly: microseconds in the file give back the events' picoseconds.
    want = [(ev[0], ev[1]) for ev in seen.events if ev[2] == "link" and ev[4] == "host->sip0.pcie_ep"]
    lanes = {tid for tid, name in threads.items() if name.split(" #")[0] == "host->sip0.pcie_ep"}
    got = [(_ps(e["ts"]), _ps(e["dur"])) for e in events if e["ph"] == "X" and e.get("tid") in lanes]
    assert sorted(got) == sorted(want) and len(got) > 10


def _tid(threads: dict[int, str], name: str) -> int:
    return next(tid for tid, n in threads.items() if n == name)


@pytest.mark.asyncio
async def test_request_flows_link_requests_to_their_responses(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    await traced_workload(path, requests=8)
    events = load(path)["traceEvents"]
    requests = {
        e["args"]["request_id"]: e
        for e in events
        if e.get("cat") == "request" and not e["args"].get("unfinished")  # frees still in flight at close
    }
    arrivals = [e for e in events if e.get("flow_in")]
    by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in arrivals:
        by_request[e["args"]["request_id"]].append(e)
    assert len(requests) > 8
    for rid, req in requests.items():
        assert req.get("flow_out") is True
        ends = by_request[rid]
        assert len(ends) == req["args"]["responses"]
        assert all(e["bind_id"] == req["bind_id"] and e["name"] == "response" for e in ends)
        assert all(e["ts"] >= req["ts"] and e["ts"] <= req["ts"] + req["dur"] for e in ends)


def run_on(runner: Callable[[Any], Any], path: Path) -> bytes:
    runner(traced_workload(path, requests=40))
    return path.read_bytes()


def test_same_workload_same_bytes_on_asyncio_and_uvloop(tmp_path: Path) -> None:
    a = run_on(asyncio.run, tmp_path / "asyncio.json")
    b = run_on(uvloop.run, tmp_path / "uvloop.json")
    c = run_on(asyncio.run, tmp_path / "again.json")
    assert len(a) > 10_000
    assert a == b, "the trace differs between asyncio and uvloop"
    assert a == c, "the trace differs from run to run"


@pytest.mark.parametrize("writer", ["process", "inline"])
@pytest.mark.asyncio
async def test_written_incrementally_and_valid_only_when_closed(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "inc.json"
    dev = make_device()
    sink = FileSink(path, flush_bytes=4096, batch=256, writer=writer)  # type: ignore[arg-type]
    tracer = Tracer(dev, sink)
    await run_workload(dev, requests=20, window=4)
    assert len(sink._pending) < 256  # memory on the simulation's side stays bounded by the batch
    sink.flush()
    size = path.stat().st_size
    assert size > 4096  # on disk while the tracer is attached
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(path.read_bytes())  # not terminated yet
    tracer.close()
    await dev.aclose()
    assert sink.events_written == len(load(path)["traceEvents"])
    validate_trace(load(path))
    with pytest.raises(TraceError, match=r"FileSink\('.*inc.json'\) is closed"):
        sink.write((0, None, "mem", "alloc", "x", None))
    sink.close()  # idempotent


def test_process_and_inline_writers_give_identical_bytes(tmp_path: Path) -> None:
    async def traced(path: Path, writer: str) -> None:
        dev = make_device(sips=2)
        with Tracer(dev, FileSink(path, batch=100, writer=writer)):  # type: ignore[arg-type]
            await run_workload(dev, requests=40, window=8)
        await dev.aclose()

    asyncio.run(traced(tmp_path / "p.json", "process"))
    asyncio.run(traced(tmp_path / "i.json", "inline"))
    a, b = (tmp_path / "p.json").read_bytes(), (tmp_path / "i.json").read_bytes()
    assert len(a) > 10_000 and a == b


def test_bad_file_sink_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="batch must be an int >= 1, got 0"):
        FileSink(tmp_path / "x.json", batch=0)
    with pytest.raises(TraceError, match="writer must be 'process' or 'inline', got 'thread'"):
        FileSink(tmp_path / "x.json", writer="thread")  # type: ignore[arg-type]
    with pytest.raises(OSError):
        FileSink(tmp_path / "no" / "such" / "dir.json")


def test_a_writer_that_dies_is_reported_with_the_path(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "dead.json", batch=1)
    assert sink._proc is not None
    sink._proc.kill()
    sink._proc.wait()
    with pytest.raises(TraceError, match=r"dead\.json.*trace writer process"):
        for i in range(10_000):  # the pipe breaks at the first write after the writer is gone
            sink.write((i, None, "mem", "alloc", "x", None))


@pytest.mark.asyncio
async def test_closing_mid_run_ends_open_spans_as_unfinished(tmp_path: Path) -> None:
    path = tmp_path / "mid.json"
    dev = make_device()
    tracer = record(dev, path)
    for i in range(6):  # requests still travelling when the file is closed
        dev.sim.spawn(dev.request(make_request(dev, i)), name=f"req{i}")
    tracer.emit("kernel", "k", "sip0.cube0.pe0.cpu", 0, None, {"program_id": [0]})  # a kernel that never ends
    await dev.sim.run(until=ns(1200))
    tracer.close()
    await dev.sim.run()
    await dev.aclose()
    doc = load(path)
    validate_trace(doc)
    unfinished = [e for e in doc["traceEvents"] if e.get("args", {}).get("unfinished")]
    assert {e["cat"] for e in unfinished} == {"request", "kernel"}
    assert sum(e["cat"] == "request" for e in unfinished) == 6
    end = doc["otherData"]["end_ps"]
    assert all(round((e["ts"] + e["dur"]) * 1e6) <= end for e in unfinished)


@pytest.mark.asyncio
async def test_odd_args_and_emitted_spans_never_break_the_file(tmp_path: Path) -> None:
    path = tmp_path / "odd.json"
    dev = make_device()

    class Thing:
        def __str__(self) -> str:
            return "a thing"

    with record(dev, path) as tracer:
        tracer.emit("mem", "alloc", "sip0.cube0.pe0.hbm", 10, None, {"big": 2**70, "np": np.int64(7), "obj": Thing()})
        tracer.emit("mem", "free", "sip0.cube0.pe0.hbm", 20, None, {1: "non-string key", "s": {3, 1, 2}})  # type: ignore[dict-item]
        tracer.emit("mmu", "map", "sip0.cube0.pe0.mmu", 30, 5, {"va": 1, "pa": 2, "size": 4096})
        tracer.emit("mmu", "map", "sip0.cube0.pe0.mmu", 32, 5, {"va": 3, "pa": 4, "size": 4096})  # overlaps
        tracer.emit("custom", "tick", "elsewhere.unit", 40, None, None)
    doc = load(path)
    validate_trace(doc)
    by_name = {(e["name"], e["ts"]): e for e in doc["traceEvents"] if e["ph"] != "M"}
    assert by_name[("alloc", 1e-5)]["args"] == {"big": str(2**70), "np": 7, "obj": "a thing"}
    assert by_name[("free", 2e-5)]["args"] == {"1": "non-string key", "s": [1, 2, 3]}
    procs = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert "elsewhere (tiny)" in procs  # a path outside sipN/host gets its own process


@pytest.mark.asyncio
async def test_concurrent_busy_spans_on_one_block_go_to_lanes(tmp_path: Path) -> None:
    sim = Sim()
    block = Block(sim, "sip0.pe0.dma")
    link = Link(sim, latency=ns(5), name="sip0.pe0.dma->sip0.pe0.hbm")

    class Dev:
        def __init__(self) -> None:
            self.sim = sim
            self.blocks = {block.name: block}
            self.links = {link.name: link}
            self.on_request = None

    async def job(delay: int) -> None:
        await sim.sleep(delay)
        await block.busy(ns(10), f"job{delay}")
        await link.carry(64)

    path = tmp_path / "lanes.json"
    with record(Dev(), path):
        for d in (0, ns(2), ns(4), ns(20)):
            sim.spawn(job(d))
        await sim.run()
    doc = load(path)
    validate_trace(doc)
    busy = sorted((e["ts"], e["tid"]) for e in doc["traceEvents"] if e.get("cat") == "busy")
    tids = [tid for _ts, tid in busy]
    assert tids[0] == tids[3] and len(set(tids[:3])) == 3  # three overlapping, the fourth reuses lane 1
