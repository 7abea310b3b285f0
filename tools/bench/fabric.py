"""Fabric benchmark: block-hops per second, `large` build cost, broadcast time.

Measures, in one run:

* wall-clock block-hops per second for a stream of PeDmaMsg probe requests
  through the full host -> PE path (a hop = one message handled by one block),
  next to the SimPy ping-pong rate of ``engine.py`` as the named peer;
* build time and peak RSS of the ``large`` preset (4096 PEs) — in a child
  process so the figure is not polluted by the rest of the run;
* wall time of one MmuMapMsg broadcast to all 4096 PEs of ``large``.

Usage: ``python tools/bench/fabric.py [N_REQUESTS]`` (default 2000).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import best_of, print_table
from engine import simpy_pingpong

import kbus
from kbus.hw import build_device
from kbus.protocol import PeDmaMsg


def probe_stream(n: int) -> tuple[int, float]:
    """Send ``n`` PeDmaMsg requests, 8 in flight at a time; return (block hops, wall s)."""

    async def main() -> tuple[int, float]:
        sim = kbus.Sim()
        dev = build_device(sim, "default")
        base = dev.config.memory.hbm_base
        coords = [node.coord for node in dev.iter_pes()]

        async def worker(w: int) -> None:
            for i in range(w, n, 8):
                s, c, p = coords[i % len(coords)]
                await dev.request(PeDmaMsg("bench", f"r{i}", s, c, p, base, 4096, is_write=bool(i & 1)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(8)))
        wall = time.perf_counter() - t0
        hops = sum(b.msgs_in for b in dev.blocks.values())
        await dev.aclose()
        return hops, wall

    return kbus.run(main)


LARGE_CHILD = r"""
import asyncio, json, resource, time, kbus
from kbus.hw import build_device
from kbus.protocol import MapEntry, MmuMapMsg
async def main():
    sim = kbus.Sim()
    t0 = time.perf_counter()
    dev = build_device(sim, "large")
    await asyncio.sleep(0)
    build = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    rs = await dev.request(MmuMapMsg("bench", "map", (MapEntry(0x1000_0000_0000, 0, 1 << 16, 7, 15, 31),)))
    bcast = time.perf_counter() - t0
    assert len(rs) == 4096
    print(json.dumps({"build": build, "rss": rss, "bcast": bcast, "vt": sim.now}))
    await dev.aclose()
kbus.run(main)
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    wall, (hops, _) = best_of(lambda: probe_stream(n), repeat=3)
    pp_n = 50_000
    simpy_wall, _ = best_of(lambda: simpy_pingpong(pp_n), repeat=3)
    hop_rate = hops / wall
    simpy_rate = 2 * pp_n / simpy_wall
    print_table(
        f"fabric: {n:,} PeDmaMsg requests through host -> PE on 'default' (best of 3)",
        ["run", "block-hops/s", "vs SimPy hops/s"],
        [
            ["kbus fabric (uvloop)", f"{hop_rate:,.0f}", f"{hop_rate / simpy_rate:.2f}x"],
            ["SimPy ping-pong (peer, engine.py)", f"{simpy_rate:,.0f}", "1.00x"],
        ],
    )
    out = subprocess.run([sys.executable, "-c", LARGE_CHILD], capture_output=True, text=True, check=True)
    large = json.loads(out.stdout.strip().splitlines()[-1])
    print_table(
        "large preset (8 x 16 x 32 = 4096 PEs), fresh process",
        ["measure", "value", "roadmap goal"],
        [
            ["build time", f"{large['build']:.2f} s", "<= 2 s"],
            ["peak RSS after build", f"{large['rss'] / 2**20:.0f} MB", "<= 300 MB"],
            [
                "MmuMapMsg broadcast to 4096 PEs",
                f"{large['bcast']:.2f} s wall ({kbus.format_time(large['vt'])} virtual)",
                "<= 1 s",
            ],
        ],
    )


if __name__ == "__main__":
    main()
