"""Tracer: attaches to every hook of a device, produces every kind of event, detaches cleanly."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from workloads import device_config, run_workload, runtime_workload

import kbus
from kbus import Block, Inbox, Link, Sim, ns
from kbus.hw import Device
from kbus.trace import TraceError, Tracer, event_dict

if TYPE_CHECKING:
    from conftest import ListSink


def hooks(device: Device) -> list[object]:
    """Every hook attribute the tracer may set, in a fixed order."""
    out: list[object] = [device.on_request, getattr(device.sim, "tracer", None)]
    out += [link.on_send for link in device.links.values()]
    for block in device.blocks.values():
        out.append(block.on_busy)
        out.append(block.inbox.on_depth)
        resp = getattr(block, "resp_inbox", None)
        if resp is not None:
            out.append(resp.on_depth)
    return out


@pytest.mark.asyncio
async def test_attach_sets_every_hook_and_detach_restores_none(make_device: Callable[..., Device]) -> None:
    dev = make_device()
    assert all(h is None for h in hooks(dev))
    tracer = Tracer(dev)
    assert repr(tracer).startswith("<Tracer attached")
    assert all(h is not None for h in hooks(dev))
    assert dev.sim.tracer is tracer
    tracer.detach()
    assert not tracer.attached
    assert all(h is None for h in hooks(dev))
    tracer.detach()  # idempotent


@pytest.mark.asyncio
async def test_every_event_kind_is_produced(list_sink: ListSink) -> None:
    async with kbus.open_device(device_config()) as torch:
        dev = torch.device
        with Tracer(dev, list_sink):
            await runtime_workload(torch)
    assert list_sink.closed
    assert list_sink.cats() == {"meta", "link", "busy", "request", "depth", "kernel", "mem", "mmu"}
    first = event_dict(list_sink.events[0])
    assert first["cat"] == "meta" and first["name"] == "topology"
    assert list(first["args"]["blocks"]) == list(dev.blocks)
    assert first["args"]["blocks"]["sip0.cube0.noc"] == "NOC"
    for ts, dur, _cat, _name, path, _args in list_sink.events:
        assert type(ts) is int and ts >= 0
        assert dur is None or (type(dur) is int and dur >= 0)
        assert isinstance(path, str)


@pytest.mark.asyncio
async def test_link_events_carry_message_fields(make_device: Callable[..., Device], list_sink: ListSink) -> None:
    dev = make_device()
    with Tracer(dev, list_sink):
        await run_workload(dev, requests=4, window=1)
    await dev.aclose()
    links = [ev for ev in list_sink.events if ev[2] == "link"]
    host_out = [ev for ev in links if ev[4] == "host->sip0.pcie_ep"]
    assert [ev[5]["request_id"] for ev in host_out if ev[5]] == ["d0", "d1", "d2", "d3"]
    first = host_out[0]
    assert first[3] == "pe_dma"
    assert first[5] is not None and set(first[5]) == {"msg_type", "correlation_id", "request_id", "bytes"}
    assert first[5]["msg_type"] == "pe_dma" and first[5]["correlation_id"] == "t" and first[5]["bytes"] > 0
    assert first[1] is not None and first[1] > 0  # offered at ts, delivered dur later
    data = [ev for ev in links if ev[3] == "data"]
    assert data and all(ev[5] is not None and set(ev[5]) == {"bytes"} for ev in data)
    responses = [ev for ev in links if ev[4] == "sip0.pcie_ep->host"]
    assert {ev[3] for ev in responses} == {"response"}


@pytest.mark.asyncio
async def test_requests_give_a_begin_marker_then_a_span(
    make_device: Callable[..., Device], list_sink: ListSink
) -> None:
    dev = make_device()
    with Tracer(dev, list_sink):
        await run_workload(dev, requests=8, window=2)
    await dev.aclose()
    reqs = [ev for ev in list_sink.events if ev[2] == "request"]
    begins = {ev[5]["request_id"]: ev for ev in reqs if ev[1] is None and ev[5]}
    spans = {ev[5]["request_id"]: ev for ev in reqs if ev[1] is not None and ev[5]}
    assert set(begins) == set(spans) == {"d0", "d1", "d2", "d3", "d4", "d5", "d6", "w7"}
    for rid, span in spans.items():
        assert span[0] == begins[rid][0]  # the span starts at the begin marker
        assert span[1] is not None and span[1] > 0
        assert span[5] is not None and span[5]["ok"] is True
    assert spans["w7"][5] is not None and spans["w7"][5]["responses"] == 4  # a broadcast write to 2x2 PEs
    assert spans["d0"][5] is not None and spans["d0"][5]["responses"] == 1


@pytest.mark.asyncio
async def test_busy_and_depth_events_name_the_block(list_sink: ListSink) -> None:
    """A hand-built device: one block, one link; checks the exact busy and depth events."""
    sim = Sim()

    class Worker(Block):
        kind = "PE_CPU"

        async def handle(self, msg: Any) -> None:
            await self.busy(ns(10), "work")

    block = Worker(sim, "sip0.cube0.pe0.cpu", capacity=4)
    link = Link(sim, latency=ns(1), name="host->sip0.cube0.pe0.cpu")

    class Dev:
        def __init__(self) -> None:
            self.sim = sim
            self.blocks = {block.name: block}
            self.links = {link.name: link}
            self.on_request = None

    with Tracer(Dev(), list_sink):
        block.start()
        for i in range(3):
            await link.send(i, block.inbox)
        await sim.run(until=ns(100))
    await sim.shutdown()
    busy = [ev for ev in list_sink.events if ev[2] == "busy"]
    assert [(ev[0], ev[1], ev[3], ev[4]) for ev in busy] == [
        (ns(1), ns(10), "work", "sip0.cube0.pe0.cpu"),
        (ns(11), ns(10), "work", "sip0.cube0.pe0.cpu"),
        (ns(21), ns(10), "work", "sip0.cube0.pe0.cpu"),
    ]
    depth = [(ev[0], ev[3], ev[4], ev[5]) for ev in list_sink.events if ev[2] == "depth"]
    assert depth[0] == (ns(1), "inbox", "sip0.cube0.pe0.cpu", {"depth": 1})
    assert max(d[3]["depth"] for d in depth if d[3]) == 2  # messages 2 and 3 queue while 1 is handled
    assert depth[-1][3] == {"depth": 0}
    plain = [ev for ev in list_sink.events if ev[2] == "link"]
    assert [ev[3] for ev in plain] == ["int", "int", "int"]  # no msg_type: the class name


@pytest.mark.asyncio
async def test_emit_records_layer_events_and_checks_its_arguments(
    make_device: Callable[..., Device], list_sink: ListSink
) -> None:
    dev = make_device()
    tracer = Tracer(dev, list_sink)
    tracer.emit("mmu", "map", "sip0.cube0.pe0.cpu", 5, None, {"va": 1, "pa": 2, "size": 4096})
    assert list_sink.events[-1] == (5, None, "mmu", "map", "sip0.cube0.pe0.cpu", {"va": 1, "pa": 2, "size": 4096})
    with pytest.raises(TraceError, match=r"ts_ps must be integer picoseconds, got float"):
        tracer.emit("mem", "alloc", "x", 1.5, None, None)  # type: ignore[arg-type]
    with pytest.raises(TraceError, match=r"dur_ps must be None or an int >= 0 ps, got -1"):
        tracer.emit("kernel", "k", "x", 1, -1, None)
    tracer.close()


@pytest.mark.asyncio
async def test_a_second_tracer_is_refused_and_the_first_keeps_its_hooks(
    make_device: Callable[..., Device],
) -> None:
    dev = make_device()
    first = Tracer(dev)
    before = hooks(dev)
    with pytest.raises(TraceError, match=r"already has a on_send hook.*another Tracer attached"):
        Tracer(dev)
    assert hooks(dev) == before  # the failed attach undid its own hooks only
    first.detach()
    Tracer(dev).detach()


def test_bad_device_and_bad_sink_are_named(make_sink: Callable[[], ListSink]) -> None:
    with pytest.raises(TraceError, match=r"object has no 'sim' attribute"):
        Tracer(object())
    sim = Sim()

    class Dev:
        def __init__(self) -> None:
            self.sim = sim
            self.blocks: dict[str, Block] = {}
            self.links: dict[str, Link] = {}
            self.on_request = None

    tracer = Tracer(Dev())
    with pytest.raises(TraceError, match=r"int is not a sink"):
        tracer.add_sink(3)  # type: ignore[arg-type]
    sink = make_sink()
    tracer.add_sink(sink)
    with pytest.raises(TraceError, match=r"already attached"):
        tracer.add_sink(sink)
    tracer.remove_sink(sink)
    with pytest.raises(TraceError, match=r"is not attached"):
        tracer.remove_sink(sink)
    tracer.close()
    with pytest.raises(TraceError, match=r"tracer is closed"):
        tracer.add_sink(make_sink())


@pytest.mark.asyncio
async def test_request_end_without_begin_and_bad_phase(list_sink: ListSink) -> None:
    """Attached mid-request: the span is empty and marked; a wrong phase names itself."""
    sim = Sim()

    class Dev:
        def __init__(self) -> None:
            self.sim = sim
            self.blocks: dict[str, Block] = {}
            self.links: dict[str, Link] = {}
            self.on_request: Any = None

    class Msg:
        msg_type = "memory_read"
        correlation_id = "c9"
        request_id = "r9"

    dev = Dev()
    tracer = Tracer(dev, list_sink)
    dev.on_request("end", Msg(), (), 100)
    assert list_sink.events[-1][:5] == (100, 0, "request", "memory_read", "host")
    assert list_sink.events[-1][5] is not None and list_sink.events[-1][5]["begin_unknown"] is True
    with pytest.raises(TraceError, match=r"phase must be 'begin' or 'end', got 'middle' for memory_read 'c9'"):
        dev.on_request("middle", Msg(), None, 100)
    tracer.close()


@pytest.mark.asyncio
async def test_no_tracer_means_no_hooks_run() -> None:
    """The engine's hooks stay None: nothing of kbus.trace runs on an untraced device."""
    sim = Sim()
    inbox: Inbox[int] = Inbox(sim, (int,), 4, name="b")
    link = Link(sim, latency=ns(1), name="a->b")
    assert link.on_send is None and inbox.on_depth is None
    await link.send(1, inbox)
    await sim.run(until=ns(5))
    assert inbox.get_nowait() == 1
