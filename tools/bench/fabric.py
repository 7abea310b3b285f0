"""Fabric benchmark: block-hops per second, an 8-PE all-to-all per data-plane model, `large` build cost.

Measures, in one run, each workload in a fresh child process per round so the
figures never share a heap:

* **block-hops/s** of a stream of PeDmaMsg probe requests through the full
  host -> PE path on ``default`` (a hop = one message handled by one block),
  against a *peer checkout* of kbus (``--peer PATH``, e.g. the main branch),
  interleaved round by round;
* **wall time of an 8-PE all-to-all** on ``tiny`` (every PE fills 64 KiB in
  every other PE's HBM through its DMA engine, all at once) with
  ``fabric.model = "flow"`` against ``"packet"``, and against the peer
  checkout's model, interleaved round by round;
* build time and peak RSS of the ``large`` preset (4096 PEs) and the wall time
  of one MmuMapMsg broadcast to all of its PEs.

Ratios are per round (this checkout / peer), reported as min / median / max,
because sequential phases on a shared machine move figures by up to 2x.

Usage::

    python tools/bench/fabric.py [--peer PATH] [--rounds N] [--requests N]

``PATH`` is the root of another kbus checkout (its ``kbus`` package is put on
``PYTHONPATH`` for the peer's child processes); without it only this
checkout's figures are printed.

History. Peer = the main branch with the store-and-forward data plane this
benchmark replaced (each link booked for a whole transfer, hop after hop);
its figures are kept here only. ``--rounds 9 --requests 3000`` on 2 cores
shared with other work (load average about 3):

* block-hops/s, this / peer per round: wall 0.72 / 0.94 / 1.61, CPU time
  0.76 / 0.92 / 1.14 (min / median / max); medians 27.1k vs 27.8k hops per
  wall second, 39.1k vs 39.8k per CPU second;
* 8-PE all-to-all, three in a row per round: flow 0.041 s, packet 0.819 s
  (17.1 / 20.4 / 23.6 x flow), store-and-forward 0.010 s (0.21 / 0.28 / 0.59 x
  flow). Device time of one all-to-all: flow 4.30 us, packet 4.30 us,
  store-and-forward 6.52 us (it charged each transfer's serialization once per
  hop);
* ``large``: build 1.50 s (peer 1.58 s), 184 MB (peer 181 MB); MmuMapMsg
  broadcast 0.50 s (peer 1.25 s) in a single quieter round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table

HERE = Path(__file__).resolve().parents[2]

CHILD = r"""
import asyncio, json, resource, sys, time
import kbus
from kbus.hw import DeviceConfig, build_device
from kbus.protocol import MapEntry, MmuMapMsg, PeDmaMsg

what, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])


async def hops():
    dev = build_device(kbus.Sim(), "default")
    base = dev.config.memory.hbm_base
    coords = [node.coord for node in dev.iter_pes()]

    async def worker(w):
        for i in range(w, n, 8):
            s, c, p = coords[i % len(coords)]
            await dev.request(PeDmaMsg("bench", f"r{i}", s, c, p, base, 4096, is_write=bool(i & 1)))

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(w) for w in range(8)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"wall": wall, "cpu": cpu, "hops": sum(b.msgs_in for b in dev.blocks.values()), "vt": dev.sim.now}
    await dev.aclose()
    return out


async def all_to_all():
    cfg = DeviceConfig.preset("tiny")
    if model != "-":
        cfg = cfg.with_overrides({"fabric.model": model})
    dev = build_device(kbus.Sim(), cfg)
    base = cfg.memory.hbm_base
    pes = [node.coord for node in dev.iter_pes()]
    t0 = time.perf_counter()
    for _ in range(n):
        errs = await asyncio.gather(*(
            dev.dma(a, b, "fill", base + i * 65536, 65536, pattern="zeros")
            for a in pes for i, b in enumerate(pes) if a != b
        ))
        assert errs == [None] * len(errs), errs[:1]
    wall = time.perf_counter() - t0
    out = {"wall": wall, "vt": dev.sim.now // n, "transfers": n * len(pes) * (len(pes) - 1)}
    await dev.aclose()
    return out


async def large():
    t0 = time.perf_counter()
    dev = build_device(kbus.Sim(), "large")
    await asyncio.sleep(0)
    build = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    rs = await dev.request(MmuMapMsg("bench", "map", (MapEntry(0x1000_0000_0000, 0, 1 << 16, 7, 15, 31),)))
    bcast = time.perf_counter() - t0
    assert len(rs) == 4096
    out = {"build": build, "rss": rss / 2**20, "bcast": bcast, "vt": dev.sim.now}
    await dev.aclose()
    return out


print(json.dumps(kbus.run({"hops": hops, "a2a": all_to_all, "large": large}[what])))
"""


def child(root: Path, what: str, model: str = "-", n: int = 1) -> dict[str, float]:
    """Run one workload in a fresh interpreter with ``root``'s kbus first on the path."""
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, what, model, str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=root,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", type=Path, help="root of another kbus checkout to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--a2a", type=int, default=3, help="all-to-all repetitions per round")
    args = ap.parse_args()
    peer: Path | None = args.peer.resolve() if args.peer else None

    hop_rates: dict[str, list[float]] = {"this": [], "peer": []}
    hop_cpu: dict[str, list[float]] = {"this": [], "peer": []}
    a2a: dict[str, list[dict[str, float]]] = {"flow": [], "packet": [], "peer": []}
    for r in range(args.rounds):
        # Alternate who goes first, so neither side always runs on a warmer machine.
        order = ["this", "peer"] if r % 2 == 0 else ["peer", "this"]
        for who in order:
            if who == "peer" and peer is None:
                continue
            res = child(HERE if who == "this" else peer or HERE, "hops", n=args.requests)
            hop_rates[who].append(res["hops"] / res["wall"])
            hop_cpu[who].append(res["hops"] / res["cpu"])
        models = ["flow", "packet", "peer"] if r % 2 == 0 else ["peer", "packet", "flow"]
        for m in models:
            if m == "peer" and peer is None:
                continue
            root = peer if m == "peer" and peer is not None else HERE
            a2a[m].append(child(root, "a2a", "-" if m == "peer" else m, args.a2a))

    rows = [
        [
            "this checkout",
            f"{statistics.median(hop_rates['this']):,.0f}",
            f"{statistics.median(hop_cpu['this']):,.0f}",
            "",
            "",
        ]
    ]
    if peer is not None:
        rows.append(
            [
                f"peer ({peer.name})",
                f"{statistics.median(hop_rates['peer']):,.0f}",
                f"{statistics.median(hop_cpu['peer']):,.0f}",
                "1.00",
                "1.00",
            ]
        )
        rows[0][3] = spread([a / b for a, b in zip(hop_rates["this"], hop_rates["peer"], strict=True)])
        rows[0][4] = spread([a / b for a, b in zip(hop_cpu["this"], hop_cpu["peer"], strict=True)])
    print_table(
        f"block-hops/s: {args.requests:,} PeDmaMsg requests, 8 in flight, host -> PE on 'default' "
        f"(median of {args.rounds} rounds; per CPU second too, less disturbed by a shared machine)",
        ["run", "per wall s", "per CPU s", "wall ratio min/med/max", "CPU ratio min/med/max"],
        rows,
    )

    def wall(m: str) -> list[float]:
        return [x["wall"] for x in a2a[m]]

    flow_w, packet_w = wall("flow"), wall("packet")
    rows = [
        ["flow (this checkout)", f"{statistics.median(flow_w):.3f} s", "1.00", "", f"{a2a['flow'][0]['vt'] / 1e6:.2f}"],
        [
            "packet (this checkout)",
            f"{statistics.median(packet_w):.3f} s",
            spread([p / f for p, f in zip(packet_w, flow_w, strict=True)]),
            "",
            f"{a2a['packet'][0]['vt'] / 1e6:.2f}",
        ],
    ]
    if peer is not None:
        peer_w = wall("peer")
        rows.append(
            [
                f"peer ({peer.name})",
                f"{statistics.median(peer_w):.3f} s",
                spread([p / f for p, f in zip(peer_w, flow_w, strict=True)]),
                "",
                f"{a2a['peer'][0]['vt'] / 1e6:.2f}",
            ]
        )
    rows[0][3] = f"{int(a2a['flow'][0]['transfers']):,} transfers"
    print_table(
        "8-PE all-to-all on 'tiny' (64 KiB each way, all at once), interleaved rounds",
        ["data plane", "wall (median)", "wall / flow min/med/max", "", "virtual us"],
        rows,
    )

    large = child(HERE, "large")
    peer_large = child(peer, "large") if peer is not None else None

    def cell(key: str, fmt: str) -> str:
        mine = fmt.format(large[key])
        return mine if peer_large is None else f"{mine} (peer {fmt.format(peer_large[key])})"

    print_table(
        "large preset (8 x 16 x 32 = 4096 PEs), fresh process (one round each)",
        ["measure", "value", "roadmap goal"],
        [
            ["build time", cell("build", "{:.2f} s"), "<= 2 s"],
            ["peak RSS after build", cell("rss", "{:.0f} MB"), "<= 300 MB"],
            [
                "MmuMapMsg broadcast to 4096 PEs",
                cell("bcast", "{:.2f} s") + f", {large['vt'] / 1e6:.1f} us virtual",
                "<= 1 s",
            ],
        ],
    )


if __name__ == "__main__":
    main()
