"""Tracing the real device (``kbus.hw.build_device``) end to end: files, flows, determinism, the stream."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
from test_chrome import validate_trace

from kbus import Sim
from kbus.hw import build_device
from kbus.protocol import MapEntry, MemoryWriteMsg, MmuMapMsg, MmuUnmapMsg, PeDmaMsg, UnmapEntry
from kbus.trace import FileSink, Tracer, serve


async def workload(dev: Any) -> None:
    """PE DMA probes on every PE, a broadcast write, and an MMU map/unmap broadcast; 4 in flight."""
    base = dev.config.memory.hbm_base
    coords = [node.coord for node in dev.iter_pes()]

    async def worker(w: int) -> None:
        for i in range(w, 24, 4):
            s, c, p = coords[i % len(coords)]
            await dev.request(PeDmaMsg("t", f"dma{i}", s, c, p, base, 4096, is_write=bool(i & 1)))

    await asyncio.gather(*(worker(w) for w in range(4)))
    await dev.request(MemoryWriteMsg("t", "bcast", 0, 0, 0, base, 8192, pattern="zeros"))
    va = dev.config.memory.va_base
    await dev.request(MmuMapMsg("t", "map", (MapEntry(va, base, 1 << 16, 0, 0, 0),)))
    await dev.request(MmuUnmapMsg("t", "unmap", (UnmapEntry(va, 1 << 16),)))


async def traced(path: Path) -> set[str]:
    dev = build_device(Sim(), "tiny")
    with Tracer(dev, FileSink(path)):
        await workload(dev)
    await dev.aclose()
    return set(dev.blocks)


@pytest.mark.asyncio
async def test_real_device_trace_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "real.json"
    blocks = await traced(path)
    doc = orjson.loads(path.read_bytes())
    counts = validate_trace(doc)
    assert counts["X"] > 100 and counts["flows"] >= 24
    events = doc["traceEvents"]
    assert {"link", "busy", "request", "mmu"} <= {e.get("cat") for e in events}
    threads = {e["args"]["name"].split(" ")[0] for e in events if e["name"] == "thread_name"}
    assert blocks <= threads  # every block has its named track
    procs = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert "host" in procs and any(p.startswith("sip0") for p in procs)


def test_real_device_trace_is_byte_identical_on_asyncio_and_uvloop(tmp_path: Path) -> None:
    asyncio.run(traced(tmp_path / "a.json"))
    uvloop.run(traced(tmp_path / "b.json"))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.asyncio
async def test_real_device_streams_to_a_subscriber() -> None:
    from websockets.asyncio.client import connect

    dev = build_device(Sim(), "tiny")
    async with serve(dev, flush_interval=0.005) as server, connect(server.url, proxy=None) as ws:
        await ws.send('{"op": "subscribe", "filter": {"cat": ["mmu"]}}')
        while orjson.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "subscribed":
            pass
        await workload(dev)
        events: list[Any] = []
        while len(events) < 2 * dev.config.num_pes:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] == "events":
                events += msg["events"]
    await dev.aclose()
    assert {e[2] for e in events} == {"mmu"}
    assert {e[3] for e in events} == {"map", "unmap"}


def flows_of(doc: dict[str, Any]) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]], list[Any]]:
    """(flow id -> request span that starts it, flow id -> link spans that end it, request spans)."""
    starts: dict[int, dict[str, Any]] = {}
    ends: dict[int, list[dict[str, Any]]] = {}
    requests = []
    for ev in doc["traceEvents"]:
        if ev.get("ph") != "X":
            continue
        if ev.get("cat") == "request":
            requests.append(ev)
        if ev.get("flow_out"):
            starts[ev["bind_id"]] = ev
        if ev.get("flow_in"):
            ends.setdefault(ev["bind_id"], []).append(ev)
    return starts, ends, requests


def check_flows_join_own_responses(doc: dict[str, Any]) -> int:
    """Every request span starts a flow, and each flow ends only at responses to that very request."""
    starts, ends, requests = flows_of(doc)
    for req in requests:
        ids = (req["args"]["correlation_id"], req["args"]["request_id"])
        assert req.get("flow_out"), f"request span {ids} has no flow"
        fid = req["bind_id"]
        got = ends.get(fid, [])
        assert len(got) == req["args"]["responses"], f"request {ids}: {len(got)} arrows for {req['args']['responses']}"
        for resp in got:
            assert (resp["args"]["correlation_id"], resp["args"]["request_id"]) == ids, (
                f"flow {fid} of request {ids} ends at a response to {resp['args']['request_id']!r}"
            )
    assert set(ends) <= set(starts)
    return len(requests)


@pytest.mark.asyncio
async def test_flows_are_keyed_by_request_not_correlation_id(tmp_path: Path) -> None:
    """A broadcast map "X" and, while it runs, a DMA "Y" under one correlation id: each binds its own responses."""
    path = tmp_path / "flows.json"
    dev = build_device(Sim(), "tiny")
    base = dev.config.memory.hbm_base
    va = dev.config.memory.va_base
    with Tracer(dev, FileSink(path)):
        await asyncio.gather(
            dev.request(MmuMapMsg("same", "X", (MapEntry(va, base, 1 << 16, 0, 0, 0),))),
            dev.request(PeDmaMsg("same", "Y", 0, 0, 0, base, 4096, is_write=False)),
        )
    await dev.aclose()
    doc = orjson.loads(path.read_bytes())
    assert check_flows_join_own_responses(doc) == 2
    starts, ends, _ = flows_of(doc)
    by_rid = {ev["args"]["request_id"]: fid for fid, ev in starts.items()}
    assert len(ends[by_rid["X"]]) == dev.config.num_pes and len(ends[by_rid["Y"]]) == 1


def test_demo_trace_flows_join_each_request_to_its_own_responses(tmp_path: Path) -> None:
    from kbus.demo import run_demo

    path = tmp_path / "demo.json"
    assert run_demo("tiny", trace=str(path)) == 0
    doc = orjson.loads(path.read_bytes())
    validate_trace(doc)
    assert check_flows_join_own_responses(doc) > 50
