"""Tracing benchmark: what a Tracer, the file sink and the live stream cost the simulation.

The same workload runs, in one process and one run, with:

* no tracer (the reference: hooks are ``None``);
* the Chrome JSON file sink (``kbus.trace.record``), closing the file included;
* the websocket stream with no client (the ring only);
* the stream with one client that reads everything (a separate process);
* the stream with one client that never reads (a separate process with a tiny
  receive buffer): its events are dropped and counted, and the simulation must
  not wait for it.

Wall time is that of the simulation (best of ``--repeat``); "events/s delivered"
is what the reading client was sent, over the time from the simulation's start
until the server had sent it everything. Roadmap goals: file sink <= 1.3x the
untraced run, slow client <= 1.1x the stream with no client.

The workload runs on the real device (``kbus.hw.build_device``, preset
``tiny``) when it exists, else on ``kbus.trace.fake.FakeDevice``: a stream of
PeDmaMsg reads/writes to every PE plus MemoryWriteMsg broadcasts, 8 in flight.

Usage: ``python tools/bench/trace.py [--requests N] [--device auto|real|fake] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table

import kbus
from kbus.trace import FileSink, Tracer, serve

CLIENT_TIMEOUT = 120.0


# ------------------------------------------------------------------ workloads
def _real_device() -> Callable[[kbus.Sim], Any] | None:
    try:
        from kbus.hw import build_device
    except ImportError:
        return None
    return lambda sim: build_device(sim, "tiny")


async def real_workload(dev: Any, n: int) -> int:
    """PeDmaMsg reads and writes round-robin over every PE, one broadcast write in 8; 8 in flight."""
    from kbus.protocol import MemoryWriteMsg, PeDmaMsg

    base = dev.config.memory.hbm_base
    coords = [node.coord for node in dev.iter_pes()]

    async def worker(w: int) -> None:
        for i in range(w, n, 8):
            s, c, p = coords[i % len(coords)]
            if i % 8 == 7:
                await dev.request(MemoryWriteMsg("bench", f"r{i}", s, c, p, base, 4096, pattern="zeros"))
            else:
                await dev.request(PeDmaMsg("bench", f"r{i}", s, c, p, base, 4096, is_write=bool(i & 1)))

    await asyncio.gather(*(worker(w) for w in range(8)))
    return int(dev.sim.now)


def make_workload(
    kind: str,
) -> tuple[str, Callable[[], Any], Callable[[Any, int], Awaitable[int]], Callable[[Any], Awaitable[None]]]:
    """(label, device factory, workload, closer) for ``kind`` in auto/real/fake."""
    factory = _real_device() if kind in ("auto", "real") else None
    if factory is not None:

        async def close_real(dev: Any) -> None:
            await dev.aclose()

        return "real device, preset 'tiny'", lambda: factory(kbus.Sim()), real_workload, close_real
    if kind == "real":
        raise SystemExit("--device real: kbus.hw.build_device is not available")
    from kbus.trace.fake import FakeDevice, run_workload

    async def fake_workload(dev: Any, n: int) -> int:
        return await run_workload(dev, requests=n, window=8)

    async def close_fake(dev: Any) -> None:
        await dev.close()

    return (
        "fake device (kbus.trace.fake), 1 SIP x 2 cubes x 2 PEs",
        lambda: FakeDevice(kbus.Sim()),
        fake_workload,
        close_fake,
    )


# ------------------------------------------------------------------- clients
CLIENT_CODE = r"""
import asyncio, socket, sys, orjson
from websockets.asyncio.client import connect

async def main(url, port, mode):
    if mode == "stall":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        ws = await connect(url, sock=sock, proxy=None, max_queue=1, ping_interval=None)
    else:
        ws = await connect(url, proxy=None, max_size=None, ping_interval=None)
    await ws.send('{"op": "subscribe"}')
    while True:
        msg = orjson.loads(await ws.recv())
        if msg["type"] == "subscribed":
            break
    print("ready", flush=True)
    if mode == "stall":
        await asyncio.sleep(3600)
    events = 0
    try:
        async for raw in ws:
            msg = orjson.loads(raw)
            if msg["type"] == "events":
                events += len(msg["events"])
    except Exception:
        pass
    print(events, flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


async def start_client(url: str, port: int, mode: str) -> asyncio.subprocess.Process:
    """Start a client process (``read`` everything or ``stall``) and wait until it has subscribed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT_CODE,
        url,
        str(port),
        mode,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), CLIENT_TIMEOUT)
    if line.strip() != b"ready":
        proc.kill()
        await proc.wait()
        raise SystemExit(f"bench client ({mode}) did not start: {line!r}")
    return proc


async def poll(cond: Callable[[], bool], interval: float) -> None:
    """Return once ``cond()`` holds, checking every ``interval`` seconds of wall time."""
    while True:
        if cond():
            return
        await asyncio.sleep(interval)


# ----------------------------------------------------------------- scenarios
Result = dict[str, Any]


def scenario(kind: str, n: int, mode: str, tmpdir: Path) -> Result:
    label, factory, workload, close = make_workload(kind)

    async def main() -> Result:
        dev = factory()
        out: Result = {"label": label}
        if mode == "none":
            t0 = time.perf_counter()
            out["end"] = await workload(dev, n)
            out["wall"] = time.perf_counter() - t0
        elif mode == "file":
            path = tmpdir / "bench.json"
            t0 = time.perf_counter()
            with Tracer(dev, FileSink(path)) as tracer:
                out["end"] = await workload(dev, n)
                sink = tracer.sinks[0]
            out["wall"] = time.perf_counter() - t0  # closing the file included
            assert isinstance(sink, FileSink)
            out["events"] = sink.events_written
            out["bytes"] = path.stat().st_size
        else:
            async with serve(dev, buffer=32768, batch=256, flush_interval=0.01) as server:
                proc = None
                if mode in ("read", "stall"):
                    proc = await start_client(server.url, server.port, mode)
                    await poll(lambda: any(c.predicate is not None for c in server.clients), 0.01)
                t0 = time.perf_counter()
                out["end"] = await workload(dev, n)
                out["wall"] = time.perf_counter() - t0
                out["events"] = server.events
                if mode == "read":
                    await poll(server.idle, 0.001)
                    delivered = time.perf_counter() - t0
                    (client,) = server.clients
                    out["sent"] = client.sent
                    out["rate"] = client.sent / delivered
                    out["dropped"] = client.dropped
                elif mode == "stall":
                    (client,) = server.clients
                    out["sent"] = client.sent
                    out["dropped"] = client.dropped
            if proc is not None:
                if mode == "read":
                    assert proc.stdout is not None
                    got = await asyncio.wait_for(proc.stdout.readline(), CLIENT_TIMEOUT)
                    out["received"] = int(got.strip() or 0)
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
        await close(dev)
        return out

    return kbus.run(main)


def best(kind: str, n: int, mode: str, repeat: int, tmpdir: Path) -> Result:
    runs = [scenario(kind, n, mode, tmpdir) for _ in range(repeat)]
    return min(runs, key=lambda r: float(r["wall"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=3000, help="host requests per run (default 3000)")
    ap.add_argument("--device", choices=("auto", "real", "fake"), default="auto")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario; the best is kept")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbus-trace-bench-") as tmp:
        tmpdir = Path(tmp)
        modes = [
            ("no tracer", "none"),
            ("file sink (Chrome JSON)", "file"),
            ("stream, no client", "stream"),
            ("stream + reading client", "read"),
            ("stream + stalled client", "stall"),
        ]
        results = {mode: best(args.device, args.requests, mode, args.repeat, tmpdir) for _label, mode in modes}
    ref = results["none"]
    ends = {r["end"] for r in results.values()}
    if len(ends) != 1:
        raise SystemExit(f"tracing changed virtual time: final times {sorted(ends)}")
    rows = []
    for label, mode in modes:
        r = results[mode]
        ratio = r["wall"] / ref["wall"]
        extra = ""
        if mode == "stall":
            extra = f"{r['wall'] / results['stream']['wall']:.2f}x vs stream, no client"
        events = r.get("events")
        rows.append(
            [
                label,
                f"{r['wall']:.3f}",
                f"{ratio:.2f}x",
                f"{events:,}" if events else "-",
                f"{r['rate']:,.0f}" if "rate" in r else "-",
                f"{r['dropped']:,}" if "dropped" in r else "-",
                extra,
            ]
        )
    label = results["none"]["label"]
    print_table(
        f"tracing cost: {args.requests:,} requests on the {label}, uvloop, best of {args.repeat}",
        ["run", "wall s", "vs no tracer", "events", "events/s delivered", "dropped", "note"],
        rows,
    )
    read = results["read"]
    if read.get("received") != read.get("sent"):
        print(f"warning: reading client received {read.get('received')} events, server sent {read.get('sent')}")
    f = results["file"]
    print(
        f"file sink: {f['events']:,} records, {f['bytes'] / 2**20:.1f} MiB; "
        f"roadmap goals: file sink <= 1.3x, stalled client <= 1.1x the stream alone"
    )


if __name__ == "__main__":
    main()
