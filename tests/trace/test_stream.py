"""The websocket stream: filtering, batching, slow and vanishing clients, errors, shutdown."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from workloads import make_device, run_workload

from kbus.trace import FIELDS, Tracer, TraceServer, serve

if TYPE_CHECKING:
    from conftest import ListSink

TIMEOUT = 20.0


async def recv_json(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str), "the server sends text frames"
    msg = orjson.loads(raw)
    assert isinstance(msg, dict)
    return msg


async def recv_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """Skip status frames (sent periodically) until a frame of type ``kind``."""
    while True:
        msg = await recv_json(ws)
        if msg["type"] == kind:
            return msg
        assert msg["type"] in ("status", "events"), msg


async def until(cond: Any, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def collect(ws: ClientConnection, server: TraceServer, stop: asyncio.Event) -> AsyncIterator[list[Any]]:
    """Event batches from ``ws`` until ``stop`` is set and the server has sent everything."""
    while True:
        try:
            msg = await recv_json(ws, timeout=0.2)
        except TimeoutError:
            if stop.is_set() and server.idle():
                return
            continue
        if msg["type"] == "events":
            yield msg["events"]


@pytest.mark.asyncio
async def test_subscriber_gets_exactly_the_filtered_events_in_batches(list_sink: ListSink) -> None:
    dev = make_device(sips=2)
    tracer = Tracer(dev, list_sink)  # serve() joins this tracer: the list sink sees the same events
    async with serve(dev, batch=64, flush_interval=0.005) as server:
        assert server.url == f"ws://127.0.0.1:{server.port}" and server.port > 0
        async with connect(server.url, proxy=None) as ws:
            first = await recv_json(ws)
            assert first["type"] == "status" and first["events"] == 0 and first["dropped"] == 0
            flt = {"path_prefix": ["sip1.cube0"], "cat": ["link", "busy"], "msg_type": "pe_dma"}
            await ws.send(orjson.dumps({"op": "subscribe", "filter": flt}).decode())
            ack = await recv_type(ws, "subscribed")
            assert ack["filter"] == {"path_prefix": ["sip1.cube0"], "cat": ["busy", "link"], "msg_type": ["pe_dma"]}
            assert ack["fields"] == list(FIELDS)
            assert list(ack["topology"]["blocks"])[:2] == ["sip0.pcie_ep", "sip0.io_cpu"]
            stop = asyncio.Event()

            async def sim() -> None:
                await run_workload(dev, requests=40, window=8)
                stop.set()

            task = asyncio.create_task(sim())
            got: list[list[Any]] = []
            sizes: list[int] = []
            async for batch in collect(ws, server, stop):
                sizes.append(len(batch))
                got += batch
            await task
    tracer.close()
    await dev.aclose()
    expected = [
        list(ev)
        for ev in list_sink.events
        if ev[2] in ("link", "busy")
        and ev[5] is not None
        and ev[5].get("msg_type") == "pe_dma"
        and any(p.startswith("sip1.cube0") for p in ev[4].split("->"))
    ]
    assert len(expected) > 20
    assert got == expected  # same events, same order, nothing else
    assert max(sizes) <= 64
    assert {e[4].split("->")[-1] for e in got if e[2] == "link"} >= {"sip1.cube0.pe0", "sip1.cube0.pe1"}


@pytest.mark.asyncio
async def test_no_subscription_means_only_status_and_unsubscribe_stops_events() -> None:
    dev = make_device()
    async with (
        serve(dev, flush_interval=0.005, status_interval=0.05) as server,
        connect(server.url, proxy=None) as ws,
    ):
        await run_workload(dev, requests=10, window=2)
        statuses = [await recv_json(ws) for _ in range(3)]
        assert all(s["type"] == "status" for s in statuses)
        assert statuses[-1]["events"] == server.events > 100
        assert statuses[-1]["now_ps"] == dev.sim.now and statuses[-1]["dropped"] == 0
        # backlog: events published before the subscription are still in the ring
        await ws.send('{"op": "subscribe", "filter": {"cat": "request"}, "backlog": true}')
        await recv_type(ws, "subscribed")
        batch: list[Any] = []
        while len(batch) < 20:  # frames are cut at block boundaries of the ring
            batch += (await recv_type(ws, "events"))["events"]
        assert {e[2] for e in batch} == {"request"} and len(batch) == 20  # 10 markers + 10 spans
        await ws.send('{"op": "unsubscribe"}')
        await recv_type(ws, "unsubscribed")
        await run_workload(dev, requests=10, window=2, first=10)
        for _ in range(3):
            assert (await recv_json(ws))["type"] == "status"
        await ws.send('{"op": "status"}')
        assert (await recv_type(ws, "status"))["events"] == server.events
    await dev.aclose()


@pytest.mark.asyncio
async def test_bad_messages_get_error_frames_naming_the_problem() -> None:
    dev = make_device()
    cases = [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object with an 'op' key, got an array"),
        ('{"filter": {}}', "message has no 'op'"),
        ('{"op": "dance"}', "unknown op 'dance'; expected one of subscribe, unsubscribe, status"),
        ('{"op": "subscribe", "filter": {"path": "sip0"}}', "unknown filter key(s) 'path'"),
        (
            '{"op": "subscribe", "filter": {"cat": 3}}',
            "filter 'cat' must be a string or an array of strings, got a number",
        ),
        ('{"op": "subscribe", "filter": {"msg_type": []}}', "filter 'msg_type' is an empty array"),
        (
            '{"op": "subscribe", "filter": {"cat": ["busy", "bussy"]}}',
            "unknown cat 'bussy'; expected one of link, busy, request, depth, mem, mmu, kernel",
        ),
        ('{"op": "subscribe", "filter": [1]}', "'filter' must be an object, got an array"),
        ('{"op": "subscribe", "backlog": "yes"}', "'backlog' must be true or false, got a string"),
        ('{"op": "subscribe", "filters": {}}', "unknown key(s) 'filters'"),
    ]
    async with serve(dev) as server, connect(server.url, proxy=None) as ws:
        for raw, reason in cases:
            await ws.send(raw)
            err = await recv_type(ws, "error")
            assert reason in err["reason"], (raw, err)
        await ws.send(b"\x00binary")
        assert "binary frames are not understood" in (await recv_type(ws, "error"))["reason"]
        await ws.send('{"op": "subscribe"}')  # still usable after errors
        assert (await recv_type(ws, "subscribed"))["filter"] == {}
    await dev.aclose()


@pytest.mark.asyncio
async def test_oversized_client_message_closes_that_connection_only() -> None:
    dev = make_device()
    async with (
        serve(dev, max_size=1024) as server,
        connect(server.url, proxy=None) as ok,
        connect(server.url, proxy=None) as big,
    ):
        await big.send('{"op": "subscribe", "pad": "' + "x" * 4096 + '"}')
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await recv_json(big)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # message too big
        await ok.send('{"op": "status"}')
        assert (await recv_type(ok, "status"))["type"] == "status"
        await until(lambda: len(server.clients) == 1, what="the oversized client to be removed")
    await dev.aclose()


async def stalled_client(url: str, port: int) -> ClientConnection:
    """A client that subscribes to everything and then never reads (tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    ws = await connect(url, sock=sock, proxy=None, max_queue=1)
    await ws.send('{"op": "subscribe"}')
    return ws


@pytest.mark.asyncio
async def test_slow_client_gets_drops_counted_and_does_not_slow_the_simulation() -> None:
    reference = make_device()
    t0 = time.perf_counter()
    end_ref = await run_workload(reference, requests=2000, window=8)
    alone = time.perf_counter() - t0
    await reference.aclose()

    dev = make_device()
    async with serve(dev, buffer=2000, batch=256, flush_interval=0.005) as server:
        ws = await stalled_client(server.url, server.port)
        await until(lambda: any(c.predicate is not None for c in server.clients), what="the subscription")
        t0 = time.perf_counter()
        end = await asyncio.wait_for(run_workload(dev, requests=2000, window=8), timeout=60 + 20 * alone)
        took = time.perf_counter() - t0
        assert end == end_ref  # tracing never changes virtual time
        (client,) = server.clients
        # Socket buffers absorb a few MB before the relay blocks; the rest is dropped and counted.
        assert server.events > 50_000
        assert client.dropped > 0, client
        assert client.sent + client.dropped <= server.events
        assert client.sent < server.events - 2000
        # No wall-clock assertion here (the benchmark measures the cost): the point is
        # that the simulation ran to its end while the client never read a frame.
        assert took > 0
    ws.transport.abort()
    await dev.aclose()


@pytest.mark.asyncio
async def test_abrupt_disconnect_is_cleaned_up_and_shutdown_does_not_hang() -> None:
    dev = make_device()
    ctx = serve(dev, flush_interval=0.005)
    server = await ctx.__aenter__()
    try:
        a = await connect(server.url, proxy=None)
        b = await connect(server.url, proxy=None)
        await a.send('{"op": "subscribe"}')
        await b.send('{"op": "subscribe"}')
        await until(lambda: len(server.clients) == 2, what="two clients")
        await run_workload(dev, requests=20, window=4)
        a.transport.abort()  # vanish without a closing handshake
        await until(lambda: len(server.clients) == 1, what="the vanished client to be removed")
        await b.close()
        await until(lambda: len(server.clients) == 0, what="the closed client to be removed")
        stalled = await stalled_client(server.url, server.port)  # still connected at shutdown
        await until(lambda: len(server.clients) == 1, what="the stalled client")
        await run_workload(dev, requests=200, window=8, first=20)
    finally:
        await asyncio.wait_for(ctx.__aexit__(None, None, None), timeout=10)
    assert server.clients == ()
    assert all(link.on_send is None for link in dev.links.values())  # the stream's own tracer is gone
    stalled.transport.abort()
    await dev.aclose()


@pytest.mark.asyncio
async def test_serve_checks_its_arguments() -> None:
    from kbus.trace import TraceError

    dev = make_device()
    for bad in (99999, 65536, -1, True, "8765"):
        with pytest.raises(
            TraceError, match=rf"port must be an int in 0\.\.65535 \(0 picks a free port\), got {bad!r}"
        ):
            async with serve(dev, port=bad):  # type: ignore[arg-type]
                pass
    with pytest.raises(TraceError, match=r"batch must be an int >= 1"):
        async with serve(dev, batch=0):
            pass
    with pytest.raises(TraceError, match=r"flush_interval must be a number of seconds > 0, got -1"):
        async with serve(dev, flush_interval=-1):
            pass
    with pytest.raises(TraceError, match=r"buffer must be an int >= 1"):
        async with serve(dev, buffer=0):
            pass
    with pytest.raises(OSError):
        async with serve(dev, host="203.0.113.1"):  # not an address of this machine
            pass
    assert all(link.on_send is None for link in dev.links.values())  # nothing left attached
    assert dev.sim.tracer is None


@pytest.mark.asyncio
async def test_clients_with_one_filter_share_each_encoded_frame() -> None:
    """Three clients, two filters: whole blocks are encoded once per filter, and everyone gets everything."""
    dev = make_device()
    async with (
        serve(dev, flush_interval=0.005, batch=64) as server,
        connect(server.url, proxy=None) as a,
        connect(server.url, proxy=None) as b,
        connect(server.url, proxy=None) as c,
    ):
        for ws, spec in ((a, "{}"), (b, "{}"), (c, '{"cat": ["busy"]}')):
            await ws.send(orjson.dumps({"op": "subscribe", "filter": orjson.loads(spec)}).decode())
            await recv_type(ws, "subscribed")
        await until(lambda: all(cl.predicate is not None for cl in server.clients), what="subscriptions")
        stop = asyncio.Event()

        async def gather(ws: ClientConnection) -> list[Any]:
            return [ev async for batch in collect(ws, server, stop) for ev in batch]

        readers = [asyncio.create_task(gather(ws)) for ws in (a, b, c)]
        await run_workload(dev, requests=40, window=4)
        stop.set()
        got_a, got_b, got_c = await asyncio.gather(*readers)
        sent_frames = sum(cl.frames for cl in server.clients)
        assert len(server.clients) == 3
    await dev.aclose()
    assert len(got_a) == server.events > 64 * 4  # several whole blocks, nothing lost
    assert got_a == got_b
    assert got_c == [ev for ev in got_a if ev[2] == "busy"]
    blocks = server.events // 64
    # Each whole block was encoded once for "{}" and once for the busy filter (plus the tail
    # pieces sent while the simulation paused), however many clients shared it.
    assert server.frames_encoded <= 2 * blocks + 6
    assert sent_frames >= 3 * blocks > server.frames_encoded


@pytest.mark.asyncio
async def test_the_viewer_page_is_served_on_the_stream_port_and_clients_are_reported() -> None:
    import urllib.error
    import urllib.request

    dev = make_device()
    seen: list[tuple[str, str]] = []

    def get(url: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    async with serve(dev) as server:
        server.on_client = lambda what, client: seen.append((what, client.peer))
        assert server.viewer_url == f"http://127.0.0.1:{server.port}/"
        status, ctype, body = await asyncio.to_thread(get, server.viewer_url)
        assert status == 200 and ctype.startswith("text/html")
        assert "<title>kbus live trace</title>" in body and "ws://${location.host}" in body
        status, _, body = await asyncio.to_thread(get, server.viewer_url + "nope.js")
        assert status == 404 and "the viewer is at /" in body
        async with connect(server.url, proxy=None) as ws:  # the websocket on the same port still works
            await ws.send('{"op": "status"}')
            assert (await recv_type(ws, "status"))["clients"] == 1
        await until(lambda: len(seen) == 2, what="the disconnect report")
    assert [w for w, _ in seen] == ["connect", "disconnect"] and seen[0][1] == seen[1][1]


def test_stream_sink_seals_blocks_and_keeps_a_bounded_ring() -> None:
    """Every ``batch`` events become one encoded block; the ring keeps ceil(buffer / batch) of them."""
    from kbus.trace import StreamSink

    sink = StreamSink(buffer=20, batch=8)  # ceil(20 / 8) = 3 sealed blocks kept
    events = [(i * 1000, 500, "busy", "work", f"sip0.cube0.pe{i % 4}", None if i % 2 else {"n": i}) for i in range(45)]
    for ev in events:
        sink.write(ev)
    assert sink.seq == 45 and sink.sealed == 5 and len(sink.pending) == 5
    assert sink.oldest == (5 - 3) * 8  # blocks 0 and 1 left the ring
    assert sink.block(1) is None and sink.block(5) is None
    assert orjson.loads(sink.block(2) or b"") == [list(ev) for ev in events[16:24]]
    assert sink.events(19, 24) == [list(ev) for ev in events[19:24]]  # decoded from a sealed block
    assert sink.events(41, 45) == events[41:45]  # the block still filling, as tuples
    assert sink.events(3, 8) == []  # gone from the ring
    with pytest.raises(Exception, match="batch must be an int >= 1"):
        StreamSink(batch=0)
