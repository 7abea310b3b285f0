"""Engine benchmark: a two-task ping-pong with a 1 ns sleep per hop.

Two tasks exchange one message N times over two inboxes, each hop sleeping
1 ns of virtual time, so the final virtual time is exactly ``2 * N`` ns (checked).
The same workload runs, in one process and one run, on:

* kbus on the default asyncio loop and on uvloop,
* SimPy (``Store`` + ``timeout``), the reference discrete-event simulator,
* a raw ``asyncio.Queue`` ping-pong on uvloop without any time: the ceiling the
  substrate allows.

Usage: ``python tools/bench/engine.py [N]`` (default 200000).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import simpy
import uvloop
from _table import best_of, print_table

import kbus

NS = 1000


def kbus_pingpong(n: int, use_uvloop: bool) -> int:
    async def main() -> int:
        sim = kbus.Sim()
        a: kbus.Inbox[int] = kbus.Inbox(sim, (int,), 1, name="a")
        b: kbus.Inbox[int] = kbus.Inbox(sim, (int,), 1, name="b")

        async def ping() -> None:
            for i in range(n):
                await sim.sleep(NS)
                await a.put(i)
                await b.get()

        async def pong() -> None:
            for _ in range(n):
                x = await a.get()
                await sim.sleep(NS)
                await b.put(x)

        sim.spawn(ping(), name="ping")
        sim.spawn(pong(), name="pong")
        await sim.run()
        return sim.now

    return kbus.run(main, use_uvloop=use_uvloop)


def simpy_pingpong(n: int) -> int:
    env = simpy.Environment()
    a = simpy.Store(env, capacity=1)
    b = simpy.Store(env, capacity=1)

    def ping():  # type: ignore[no-untyped-def]
        for i in range(n):
            yield env.timeout(NS)
            yield a.put(i)
            yield b.get()

    def pong():  # type: ignore[no-untyped-def]
        for _ in range(n):
            x = yield a.get()
            yield env.timeout(NS)
            yield b.put(x)

    env.process(ping())
    env.process(pong())
    env.run()
    return int(env.now)


def raw_queue_pingpong(n: int) -> int:
    async def main() -> int:
        a: asyncio.Queue[int] = asyncio.Queue(1)
        b: asyncio.Queue[int] = asyncio.Queue(1)

        async def ping() -> None:
            for i in range(n):
                await a.put(i)
                await b.get()

        async def pong() -> None:
            for _ in range(n):
                x = await a.get()
                await b.put(x)

        await asyncio.gather(ping(), pong())
        return 2 * n * NS

    return uvloop.run(main())


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    hops = 2 * n
    expected = 2 * n * NS
    runs = [
        ("kbus (asyncio loop)", lambda: kbus_pingpong(n, False)),
        ("kbus (uvloop)", lambda: kbus_pingpong(n, True)),
        ("SimPy 4 (Store + timeout)", lambda: simpy_pingpong(n)),
        ("asyncio.Queue on uvloop, no time (ceiling)", lambda: raw_queue_pingpong(n)),
    ]
    results: dict[str, float] = {}
    for label, fn in runs:
        t, end = best_of(fn, repeat=3)
        if end != expected:
            raise SystemExit(f"{label}: final virtual time {end} != expected {expected}")
        results[label] = hops / t
    simpy_rate = results["SimPy 4 (Store + timeout)"]
    rows = [[label, f"{rate:,.0f}", f"{rate / simpy_rate:.2f}x"] for label, rate in results.items()]
    print_table(
        f"engine ping-pong, N={n:,} round trips ({hops:,} hops), best of 3", ["run", "hops/s", "vs SimPy"], rows
    )


if __name__ == "__main__":
    main()
