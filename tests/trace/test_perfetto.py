"""The Perfetto protobuf file, decoded with the published schema and compared with the JSON file.

Both files come from one run (two sinks on one tracer), so everything the JSON
file says — tracks, slices, their times in nanoseconds, args, flows, counters —
must be in the protobuf file too. The decoder is the ``perfetto`` package's
generated code for ``protos/perfetto/trace/perfetto_trace.proto``, not ours.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
from test_chrome import validate_trace
from test_real_device import workload

from kbus import Sim
from kbus.hw import build_device
from kbus.trace import FileSink, Tracer

pb = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2")

Slice = tuple[str, str, int, int]  # (track name, slice name, begin ns, end ns)


async def traced_both(json_path: Path, proto_path: Path, writer: str = "process") -> None:
    dev = build_device(Sim(), "tiny")
    with Tracer(dev, FileSink(json_path, writer=writer), FileSink(proto_path, writer=writer)):  # type: ignore[arg-type]
        await workload(dev)
    await dev.aclose()


def annotation_value(a: Any, strings: dict[int, str]) -> Any:
    which = a.WhichOneof("value")
    if which is None and a.dict_entries:
        return {e.name: annotation_value(e, strings) for e in a.dict_entries}
    if which is None and a.array_values:
        return [annotation_value(e, strings) for e in a.array_values]
    if which == "string_value_iid":
        return strings[a.string_value_iid]
    return getattr(a, which)


def decode(path: Path) -> dict[str, Any]:
    """Tracks, slices with args, counters and flows of a Perfetto trace, checked as it is read."""
    trace = pb.Trace.FromString(path.read_bytes())
    names: dict[int, str] = {}
    keys: dict[int, str] = {}
    strings: dict[int, str] = {}
    tracks: dict[int, Any] = {}
    open_: dict[int, list[tuple[str, int, dict[str, Any], list[int], list[int]]]] = defaultdict(list)
    slices: list[tuple[Slice, dict[str, Any], list[int], list[int]]] = []
    counters: list[tuple[str, int, float]] = []
    instants: list[tuple[str, str, int]] = []
    assert trace.packet[0].sequence_flags & pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
    for packet in trace.packet:
        assert packet.trusted_packet_sequence_id == 1
        for n in packet.interned_data.event_names:
            assert n.iid not in names
            names[n.iid] = n.name
        if packet.sequence_flags & pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED:
            names.clear()
            keys.clear()
            strings.clear()
        for n in packet.interned_data.debug_annotation_names:
            keys[n.iid] = n.name
        for v in packet.interned_data.debug_annotation_string_values:
            strings[v.iid] = v.str.decode()
        if packet.HasField("track_descriptor"):
            td = packet.track_descriptor
            assert td.uuid not in tracks, f"track {td.uuid} described twice"
            if td.HasField("parent_uuid"):
                assert td.parent_uuid in tracks, f"track {td.name!r} names a parent described later or never"
            tracks[td.uuid] = td
        if not packet.HasField("track_event"):
            continue
        te = packet.track_event
        assert te.track_uuid in tracks, f"event on undescribed track {te.track_uuid}"
        ts = packet.timestamp
        track = tracks[te.track_uuid].name
        if te.type == pb.TrackEvent.TYPE_COUNTER:
            counters.append((track, ts, te.counter_value))
            continue
        args = {keys[a.name_iid]: annotation_value(a, strings) for a in te.debug_annotations}
        if te.type == pb.TrackEvent.TYPE_INSTANT:
            instants.append((track, names[te.name_iid], ts))
        elif te.type == pb.TrackEvent.TYPE_SLICE_BEGIN:
            stack = open_[te.track_uuid]
            assert not stack, f"track {track!r}: a slice begins inside another (lanes must keep slices disjoint)"
            stack.append((names[te.name_iid], ts, args, list(te.flow_ids), list(te.terminating_flow_ids)))
        else:
            assert te.type == pb.TrackEvent.TYPE_SLICE_END
            name, begin, a, flows, ends = open_[te.track_uuid].pop()
            assert ts >= begin
            slices.append(((track, name, begin, ts), a, flows, ends))
    assert not any(open_.values()), "slices never ended"
    return {"tracks": tracks, "slices": slices, "counters": counters, "instants": instants}


def json_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The same facts from the Chrome JSON file, times rounded down to nanoseconds as Perfetto does."""
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    slices, counters, instants = [], [], []
    for e in doc["traceEvents"]:
        ps = round(e["ts"] * 1e6)
        if e["ph"] == "X":
            end = ps + round(e["dur"] * 1e6)
            slices.append(((threads[(e["pid"], e["tid"])], e["name"], ps // 1000, end // 1000), e.get("args", {})))
        elif e["ph"] == "C":
            counters.append((e["name"], ps // 1000, e["args"]["depth"]))
        elif e["ph"] == "i":
            instants.append((threads[(e["pid"], e["tid"])], e["name"], ps // 1000))
    return {"slices": slices, "counters": counters, "instants": instants}


def test_perfetto_file_says_what_the_json_file_says(tmp_path: Path) -> None:
    jpath, ppath = tmp_path / "run.json", tmp_path / "run.pftrace"
    asyncio.run(traced_both(jpath, ppath))
    doc = orjson.loads(jpath.read_bytes())
    validate_trace(doc)
    want, got = json_view(doc), decode(ppath)
    assert len(got["slices"]) == len(want["slices"]) > 100
    assert sorted((s, sorted(a.items())) for s, a, _f, _t in got["slices"]) == sorted(
        (s, sorted(a.items())) for s, a in want["slices"]
    )
    assert Counter(got["instants"]) == Counter(want["instants"]) and got["instants"]
    assert sorted(c[1:] for c in got["counters"]) == sorted(c[1:] for c in want["counters"])
    processes = {td.process.process_name for td in got["tracks"].values() if td.HasField("process")}
    assert "host" in processes and any(p.startswith("sip0") for p in processes)
    # The protobuf file is the compact one.
    assert ppath.stat().st_size * 5 < jpath.stat().st_size * 2  # measured: 3.0x smaller


def test_perfetto_flows_join_each_request_to_its_own_responses(tmp_path: Path) -> None:
    jpath, ppath = tmp_path / "run.json", tmp_path / "run.pftrace"
    asyncio.run(traced_both(jpath, ppath))
    slices = decode(ppath)["slices"]
    ending: dict[int, dict[str, Any]] = {}
    for _s, args, _flows, ends in slices:
        for fid in ends:
            assert fid not in ending, "a flow ends twice"
            ending[fid] = args
    requests = [(s, a, f) for s, a, f, _t in slices if s[0].split(" #")[0] == "requests"]
    assert len(requests) >= 24
    for (_track, name, _b, _e), args, flows in requests:
        assert len(flows) == args["responses"] >= 1, f"request {args['request_id']!r} ({name})"
        for fid in flows:
            assert ending[fid]["request_id"] == args["request_id"]
    assert sum(len(f) for _s, _a, f in requests) == len(ending)


def test_perfetto_file_is_identical_across_loops_and_writers(tmp_path: Path) -> None:
    asyncio.run(traced_both(tmp_path / "a.json", tmp_path / "a.pftrace"))
    uvloop.run(traced_both(tmp_path / "b.json", tmp_path / "b.pftrace", writer="inline"))
    assert (tmp_path / "a.pftrace").read_bytes() == (tmp_path / "b.pftrace").read_bytes()


def test_format_is_chosen_by_suffix_or_forced(tmp_path: Path) -> None:
    assert FileSink(tmp_path / "x.pftrace", writer="inline").format == "perfetto"
    assert FileSink(tmp_path / "x.perfetto", writer="inline").format == "perfetto"
    assert FileSink(tmp_path / "x.json", writer="inline").format == "json"
    assert FileSink(tmp_path / "x.bin", writer="inline", format="perfetto").format == "perfetto"
    from kbus.trace import TraceError

    with pytest.raises(TraceError, match="format must be 'auto', 'json' or 'perfetto', got 'csv'"):
        FileSink(tmp_path / "x.csv", format="csv")  # type: ignore[arg-type]


def test_varints_match_the_protobuf_library() -> None:
    from google.protobuf.internal.encoder import _VarintBytes  # the reference encoder
    from hypothesis import given
    from hypothesis import strategies as st

    from kbus.trace._perfetto_encode import varint

    @given(st.integers(min_value=0, max_value=2**64 - 1))
    def same(n: int) -> None:
        assert varint(n) == _VarintBytes(n)

    same()
    for n in (0, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**35 - 1, 2**35):
        assert varint(n) == _VarintBytes(n)
    assert varint(-1) == _VarintBytes(2**64 - 1)  # int64 -1 on the wire


def test_open_device_and_demo_write_perfetto_by_suffix(tmp_path: Path) -> None:
    import kbus
    from kbus.demo import run_demo

    async def main() -> None:
        async with kbus.open_device("tiny", trace=str(tmp_path / "rt.pftrace")) as torch:
            a = torch.arange(1024, dtype="float32")
            await (a + 1.0).numpy()

    asyncio.run(main())
    got = decode(tmp_path / "rt.pftrace")
    assert any(s[0].startswith("requests") for s, *_ in got["slices"])
    assert run_demo("tiny", trace=str(tmp_path / "demo.pftrace")) == 0
    assert len(decode(tmp_path / "demo.pftrace")["slices"]) > 500
