"""attach_from_open_device: what ``kbus.open_device(trace=..., trace_ws=...)`` runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from test_chrome import validate_trace
from websockets.asyncio.client import connect
from workloads import make_device, run_workload

import kbus
from kbus.trace import TraceError, attach_from_open_device, parse_ws_spec


def test_ws_spec_forms_and_errors() -> None:
    assert parse_ws_spec(True) == {"host": "127.0.0.1", "port": 8765}
    assert parse_ws_spec(0) == {"host": "127.0.0.1", "port": 0}
    assert parse_ws_spec("localhost:9000") == {"host": "localhost", "port": 9000}
    assert parse_ws_spec("ws://127.0.0.1:9001") == {"host": "127.0.0.1", "port": 9001}
    assert parse_ws_spec("ws://[::1]:9002") == {"host": "::1", "port": 9002}
    assert parse_ws_spec({"port": 1, "batch": 64}) == {"port": 1, "batch": 64}
    for bad, reason in [
        (70000, "a port must be in 0..65535"),
        ("http://x:1", "expected 'host:port' or 'ws://host:port'"),
        ("x:notaport", "expected 'host:port'"),
        (2.5, "got float 2.5"),
    ]:
        with pytest.raises(TraceError, match=reason):
            parse_ws_spec(bad)


@pytest.mark.asyncio
async def test_nothing_asked_nothing_attached() -> None:
    dev = make_device()
    async with attach_from_open_device(dev) as session:
        assert session is None
        assert all(link.on_send is None for link in dev.links.values())
        assert dev.sim.tracer is None
    async with attach_from_open_device(dev, trace=None, trace_ws=False) as session:
        assert session is None


@pytest.mark.asyncio
async def test_file_and_stream_together(tmp_path: Path) -> None:
    path = tmp_path / "both.json"
    dev = make_device()
    async with attach_from_open_device(dev, trace=path, trace_ws=0) as session:
        assert session is not None and session.server is not None
        assert session.server.port > 0
        async with connect(session.server.url, proxy=None) as ws:
            await ws.send('{"op": "subscribe", "filter": {"cat": "request"}}')
            while orjson.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "subscribed":
                pass
            await run_workload(dev, requests=4, window=2)
            seen: list[object] = []
            while len(seen) < 8:  # 4 begin markers, 4 spans
                msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] == "events":
                    seen += msg["events"]
    assert all(link.on_send is None for link in dev.links.values())
    assert dev.sim.tracer is None
    counts = validate_trace(orjson.loads(path.read_bytes()))
    assert counts["flows"] >= 4
    await dev.aclose()


@pytest.mark.asyncio
async def test_bad_trace_argument_is_named() -> None:
    dev = make_device()
    with pytest.raises(TraceError, match=r"open_device\(trace=...\) takes a file path, got int 3"):
        async with attach_from_open_device(dev, trace=3):  # type: ignore[arg-type]
            pass
    assert dev.sim.tracer is None  # the half-built tracer was detached


@pytest.mark.asyncio
async def test_open_device_writes_a_trace(tmp_path: Path) -> None:
    open_device = kbus.open_device
    from kbus.protocol import PeDmaMsg

    path = tmp_path / "open.json"
    async with open_device("tiny", trace=path) as torch:
        dev = torch.device
        base = dev.config.memory.hbm_base
        for i in range(4):
            await dev.request(PeDmaMsg("t", f"r{i}", 0, 0, i, base, 4096))
    counts = validate_trace(orjson.loads(path.read_bytes()))
    assert counts["X"] > 20 and counts["flows"] >= 4
