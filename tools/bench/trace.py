"""Tracing benchmark: what a Tracer, the file sink and the live stream cost the simulation.

The same workload runs with:

* no tracer (the peer: hooks are ``None``);
* the Chrome JSON file sink with its writer process, closing the file included;
* the same file sink with the inline writer (encoding in this process);
* the Perfetto protobuf file sink (``.pftrace``), writer process;
* the websocket stream with no client (the ring only);
* the stream with one client that reads everything (a separate process);
* the stream with one client that never reads (a separate process with a tiny
  receive buffer): its events are dropped and counted, and the simulation must
  not wait for it.

Scenarios are interleaved round by round (every scenario once per round), and
each traced run is divided by the untraced run of the same round: the table
gives min / median / max of those ratios, so machine load drifting over the
run moves all scenarios alike. Every run must end at the same virtual time.
"events/s delivered" is what the reading client was sent, over the time from
the simulation's start until the server had sent it everything.

The workload runs on the real device (preset ``tiny`` by default): PeDmaMsg
reads/writes to every PE plus MemoryWriteMsg broadcasts, 8 in flight.

Usage: ``python tools/bench/trace.py [--requests N] [--preset NAME] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table

import kbus
from kbus.hw import build_device
from kbus.trace import FileSink, Tracer, serve

CLIENT_TIMEOUT = 120.0


# ------------------------------------------------------------------ workloads
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


def scenario(preset: str, n: int, mode: str, tmpdir: Path) -> Result:
    workload = real_workload

    async def main() -> Result:
        dev = build_device(kbus.Sim(), preset)
        out: Result = {}
        if mode == "none":
            t0 = time.perf_counter()
            out["end"] = await workload(dev, n)
            out["wall"] = time.perf_counter() - t0
        elif mode in ("file", "inline", "perfetto"):
            path = tmpdir / ("bench.pftrace" if mode == "perfetto" else "bench.json")
            t0 = time.perf_counter()
            writer = "inline" if mode == "inline" else "process"
            with Tracer(dev, FileSink(path, writer=writer)) as tracer:
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
                    out["produced"] = server.events / out["wall"]  # the simulation's own event rate
                    out["lag"] = delivered - out["wall"]  # how long after the run the client had everything
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
        await dev.aclose()
        return out

    return kbus.run(main)


MODES = [
    ("no tracer", "none"),
    ("file sink, writer process", "file"),
    ("file sink, inline writer", "inline"),
    ("Perfetto protobuf sink", "perfetto"),
    ("stream, no client", "stream"),
    ("stream + reading client", "read"),
    ("stream + stalled client", "stall"),
]


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=3000, help="host requests per run (default 3000)")
    ap.add_argument("--preset", default="tiny", help="device preset (default tiny)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs every scenario once (default 5)")
    args = ap.parse_args()
    if args.requests < 1 or args.rounds < 1:
        ap.error("--requests and --rounds must be >= 1")
    runs: dict[str, list[Result]] = {mode: [] for _label, mode in MODES}
    with tempfile.TemporaryDirectory(prefix="kbus-trace-bench-") as tmp:
        for r in range(args.rounds):
            for _label, mode in MODES:
                runs[mode].append(scenario(args.preset, args.requests, mode, Path(tmp)))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    ends = {res["end"] for results in runs.values() for res in results}
    if len(ends) != 1:
        raise SystemExit(f"tracing changed virtual time: final times {sorted(ends)}")
    ref = [res["wall"] for res in runs["none"]]
    rows = []
    for label, mode in MODES:
        walls = [res["wall"] for res in runs[mode]]
        ratios = [w / base for w, base in zip(walls, ref, strict=True)]
        last = runs[mode][-1]
        note = ""
        if mode == "stall":
            alone = [res["wall"] for res in runs["stream"]]
            note = spread([w / a for w, a in zip(walls, alone, strict=True)]) + " vs stream, no client"
        if "bytes" in last:
            note = f"{last['bytes'] / last['events']:.0f} bytes/record"
        if mode == "read":
            produced = statistics.median(res["produced"] for res in runs[mode])
            lag = statistics.median(res["lag"] for res in runs[mode])
            note = f"produced {produced:,.0f}/s; all sent {lag * 1e3:.0f} ms after the run"
        rates = [res["rate"] for res in runs[mode] if "rate" in res]
        rows.append(
            [
                label,
                spread(ratios),
                f"{last['events']:,}" if last.get("events") else "-",
                f"{statistics.median(rates):,.0f}" if rates else "-",
                f"{last['dropped']:,}" if "dropped" in last else "-",
                note,
            ]
        )
    print_table(
        f"tracing cost: {args.requests:,} requests on preset {args.preset!r}, uvloop, {args.rounds} interleaved rounds",
        ["run", "vs no tracer (min / median / max)", "events", "events/s delivered", "dropped", "note"],
        rows,
    )
    print(f"untraced run: median {statistics.median(ref):.3f} s of wall time; virtual end {ends.pop()} ps")
    for res in runs["read"]:
        if res.get("received") != res.get("sent"):
            print(f"warning: reading client received {res.get('received')} events, server sent {res.get('sent')}")
    print(
        "goals: file sink <= 1.3x; Perfetto sink <= 1.2x; stream with no client <= 1.1x; reading client >= 200k "
        "events/s with the simulation <= 1.5x; stalled client <= 1.1x the stream alone"
    )


if __name__ == "__main__":
    main()
