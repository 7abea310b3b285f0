"""Engine benchmark: kbus against SimPy (and against another kbus tree), interleaved.

Four workloads, each written once for kbus and once for SimPy with the same
virtual-time semantics; the benchmark checks that both end at the same virtual
time before it reports a figure:

* ``pingpong``: two tasks exchange one message N times over two capacity-1
  inboxes, sleeping 1 ns per hop (end time ``2 * N`` ns);
* ``fanout``: one producer sends M messages round robin over 64 links (latency
  and bandwidth) to 64 consumers, each serves a message for a while and sends
  it back over its own link to one collector (fan-out / fan-in);
* ``sleepers``: 1000 tasks, each sleeping 100 seeded random delays (1-999 ns);
* ``host``: 8 *host* tasks (plain asyncio tasks, not simulated) each send
  requests over a shared link into a chain of 4 blocks (as a device request
  crosses PCIE_EP, IO_CPU, M_CPU and the NoC), the last block answers over a
  link to a collector, and the host awaits the future the collector resolves,
  as ``Device.request`` does.

Every measurement runs in a fresh child process (``--child``), so kbus, SimPy
and a baseline kbus tree start from the same state. The clock is the child's
CPU time by default (``--clock cpu``): every workload is single-threaded and
never waits on I/O, so CPU time is what the work costs, and it is far less
disturbed than wall time by other processes on a shared machine; ``--clock
wall`` measures wall time instead. A round runs every
implementation once per workload, in an order rotated round by round; the
table reports min / median / max over rounds of the per-round wall-time
ratio, which is robust to a machine that gets busier or quieter meanwhile.

``--baseline-src DIR`` names another kbus source tree (a checkout of an older
commit): the same workloads then also run against it, and the table gains a
"vs baseline" column. The child drops editable-install import hooks and puts
DIR first on ``sys.path``; it reports the ``kbus`` file it imported, which the
parent checks.

The raw ``asyncio.Queue`` ping-pong on the same loop, without any notion of
time, is a reference row only (the substrate's ceiling).

Usage::

    python tools/bench/engine.py [--rounds 5] [--scale 1.0] [--loop uvloop|asyncio]
                                 [--clock cpu|wall] [--baseline-src DIR] [--only WORKLOAD ...]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

NS = 1000  # picoseconds

# Workload parameters (picoseconds and bytes); both implementations read these.
FAN_K = 64
FAN_LATENCY = 100 * NS
FAN_BANDWIDTH = 8_000_000_000  # bytes/s: 64 B take 8 ns
FAN_BYTES = 64
FAN_SERVICE = 300 * NS
SLEEPERS = 1000
SLEEPS = 100
HOST_WORKERS = 8
HOST_LATENCY = 100 * NS
HOST_BANDWIDTH = 8_000_000_000
HOST_BYTES = 64
HOST_SERVICE = 50 * NS
HOST_HOPS = 4

SIZES = {"pingpong": 50_000, "fanout": 20_000, "sleepers": SLEEPERS * SLEEPS, "host": 4_000}
GOALS = {"pingpong": (3.0, None), "fanout": (2.5, None), "sleepers": (1.0, None), "host": (None, 1.5)}


def _serialization(nbytes: int, bandwidth: int) -> int:
    return -(-nbytes * 10**12 // bandwidth)


_DELAYS: dict[int, list[list[int]]] = {}


def _delays(total: int) -> list[list[int]]:
    """``total`` sleeps spread over SLEEPERS tasks, seeded; drawn once per process, before timing starts."""
    if total not in _DELAYS:
        rng = random.Random(11)
        per_task = max(1, total // SLEEPERS)
        _DELAYS[total] = [[rng.randrange(1, 1000) * NS for _ in range(per_task)] for _ in range(SLEEPERS)]
    return _DELAYS[total]


# --------------------------------------------------------------------------- SimPy
def simpy_pingpong(n: int) -> int:
    """SimPy ping-pong of ``n`` round trips; returns the final virtual time (ps)."""
    import simpy

    env = simpy.Environment()
    a = simpy.Store(env, capacity=1)
    b = simpy.Store(env, capacity=1)

    def ping() -> Generator[Any, Any, None]:
        for i in range(n):
            yield env.timeout(NS)
            yield a.put(i)
            yield b.get()

    def pong() -> Generator[Any, Any, None]:
        for _ in range(n):
            x = yield a.get()
            yield env.timeout(NS)
            yield b.put(x)

    env.process(ping())
    env.process(pong())
    env.run()
    return int(env.now)


class _SimpyLink:
    """kbus's Link rules in SimPy: the sender holds the link for the serialization, delivery comes latency later."""

    def __init__(self, env: Any, latency: int, bandwidth: int) -> None:
        self.env = env
        self.latency = latency
        self.bandwidth = bandwidth
        self.free_at = 0

    def send(self, msg: Any, store: Any, nbytes: int) -> Generator[Any, Any, None]:
        env = self.env
        now = env.now
        start = max(now, self.free_at)
        done = start + _serialization(nbytes, self.bandwidth)
        self.free_at = done
        if done > now:
            yield env.timeout(done - now)
        deliver = done + self.latency
        if deliver <= env.now:
            store.put(msg)
        else:
            env.timeout(deliver - env.now).callbacks.append(lambda _ev: store.put(msg))


def simpy_fanout(m: int) -> int:
    import simpy

    env = simpy.Environment()
    boxes = [simpy.Store(env) for _ in range(FAN_K)]
    collector_box = simpy.Store(env)
    out = [_SimpyLink(env, FAN_LATENCY, FAN_BANDWIDTH) for _ in range(FAN_K)]
    back = [_SimpyLink(env, FAN_LATENCY, FAN_BANDWIDTH) for _ in range(FAN_K)]

    def producer() -> Generator[Any, Any, None]:
        for i in range(m):
            yield from out[i % FAN_K].send(i, boxes[i % FAN_K], FAN_BYTES)

    def consumer(j: int) -> Generator[Any, Any, None]:
        while True:
            x = yield boxes[j].get()
            yield env.timeout(FAN_SERVICE)
            yield from back[j].send(x, collector_box, FAN_BYTES)

    def collector() -> Generator[Any, Any, None]:
        for _ in range(m):
            yield collector_box.get()

    env.process(producer())
    for j in range(FAN_K):
        env.process(consumer(j))
    done = env.process(collector())
    env.run(until=done)
    return int(env.now)


def simpy_sleepers(n: int) -> int:
    import simpy

    delays = _delays(n)
    env = simpy.Environment()

    def sleeper(ds: list[int]) -> Generator[Any, Any, None]:
        for d in ds:
            yield env.timeout(d)

    for ds in delays:
        env.process(sleeper(ds))
    env.run()
    return int(env.now)


def simpy_host(r: int) -> int:
    import simpy

    env = simpy.Environment()
    up = _SimpyLink(env, HOST_LATENCY, HOST_BANDWIDTH)
    links = [_SimpyLink(env, HOST_LATENCY, HOST_BANDWIDTH) for _ in range(HOST_HOPS)]
    boxes = [simpy.Store(env) for _ in range(HOST_HOPS)]
    collector_box = simpy.Store(env)

    def worker(w: int) -> Generator[Any, Any, None]:
        for i in range(w, r, HOST_WORKERS):
            answered = env.event()
            yield from up.send((i, answered), boxes[0], HOST_BYTES)
            yield answered

    def serve(h: int) -> Generator[Any, Any, None]:
        nxt = boxes[h + 1] if h + 1 < HOST_HOPS else collector_box
        while True:
            req = yield boxes[h].get()
            yield env.timeout(HOST_SERVICE)
            yield from links[h].send(req, nxt, HOST_BYTES)

    def collect() -> Generator[Any, Any, None]:
        while True:
            req = yield collector_box.get()
            req[1].succeed(env.now)

    workers = [env.process(worker(w)) for w in range(HOST_WORKERS)]
    for h in range(HOST_HOPS):
        env.process(serve(h))
    env.process(collect())
    env.run(until=simpy.AllOf(env, workers))
    return int(env.now)


# ---------------------------------------------------------------------------- kbus
# Only public names that every kbus tree has, so the same code runs against a baseline.
async def kbus_pingpong(n: int) -> int:
    import kbus

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


async def kbus_fanout(m: int) -> int:
    import kbus

    sim = kbus.Sim()
    boxes = [kbus.Inbox(sim, (int,), m, name=f"c{j}") for j in range(FAN_K)]
    collector_box: kbus.Inbox[int] = kbus.Inbox(sim, (int,), m, name="collector")
    out = [kbus.Link(sim, latency=FAN_LATENCY, bandwidth=FAN_BANDWIDTH, name=f"out{j}") for j in range(FAN_K)]
    back = [kbus.Link(sim, latency=FAN_LATENCY, bandwidth=FAN_BANDWIDTH, name=f"back{j}") for j in range(FAN_K)]

    async def producer() -> None:
        for i in range(m):
            await out[i % FAN_K].send(i, boxes[i % FAN_K], FAN_BYTES)

    async def consumer(j: int) -> None:
        box, link = boxes[j], back[j]
        while True:
            x = await box.get()
            await sim.sleep(FAN_SERVICE)
            await link.send(x, collector_box, FAN_BYTES)

    async def collector() -> None:
        for _ in range(m):
            await collector_box.get()

    sim.spawn(producer(), name="producer")
    for j in range(FAN_K):
        sim.spawn(consumer(j), name=f"consumer{j}", daemon=True)
    sim.spawn(collector(), name="collector")
    await sim.run()
    return sim.now


async def kbus_sleepers(n: int) -> int:
    import kbus

    delays = _delays(n)
    sim = kbus.Sim()

    async def sleeper(ds: list[int]) -> None:
        for d in ds:
            await sim.sleep(d)

    for i, ds in enumerate(delays):
        sim.spawn(sleeper(ds), name=f"s{i}")
    await sim.run()
    return sim.now


async def kbus_host(r: int) -> int:
    import kbus

    sim = kbus.Sim()
    up = kbus.Link(sim, latency=HOST_LATENCY, bandwidth=HOST_BANDWIDTH, name="up")
    links = [kbus.Link(sim, latency=HOST_LATENCY, bandwidth=HOST_BANDWIDTH, name=f"l{h}") for h in range(HOST_HOPS)]
    boxes: list[kbus.Inbox[Any]] = [kbus.Inbox(sim, (tuple,), r, name=f"b{h}") for h in range(HOST_HOPS)]
    collector_box: kbus.Inbox[Any] = kbus.Inbox(sim, (tuple,), r, name="collector")

    async def serve(h: int) -> None:
        box, link = boxes[h], links[h]
        nxt = boxes[h + 1] if h + 1 < HOST_HOPS else collector_box
        while True:
            req = await box.get()
            await sim.sleep(HOST_SERVICE)
            await link.send(req, nxt, HOST_BYTES)

    async def collect() -> None:
        while True:
            req = await collector_box.get()
            req[1].set_result(sim.now)

    for h in range(HOST_HOPS):
        sim.spawn(serve(h), name=f"block{h}", daemon=True)
    sim.spawn(collect(), name="collector", daemon=True)

    async def worker(w: int) -> None:  # a host task: plain asyncio, awaiting the engine
        for i in range(w, r, HOST_WORKERS):
            answered = sim.create_future(f"request {i}")
            await up.send((i, answered), boxes[0], HOST_BYTES)
            await answered

    await asyncio.gather(*(worker(w) for w in range(HOST_WORKERS)))
    return sim.now


async def queue_pingpong(n: int) -> int:
    """The ceiling: asyncio.Queue ping-pong without time; reports the end time it would have had."""
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


KBUS: dict[str, Callable[[int], Any]] = {
    "pingpong": kbus_pingpong,
    "fanout": kbus_fanout,
    "sleepers": kbus_sleepers,
    "host": kbus_host,
}
SIMPY: dict[str, Callable[[int], int]] = {
    "pingpong": simpy_pingpong,
    "fanout": simpy_fanout,
    "sleepers": simpy_sleepers,
    "host": simpy_host,
}


# --------------------------------------------------------------------------- child
def _use_source_tree(src: str) -> None:
    """Import kbus from ``src``: drop editable-install finders, which outrank ``sys.path``."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path.insert(0, str(Path(src).resolve()))


def _run_loop(main: Callable[[], Any], loop_name: str) -> Any:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def child(impl: str, workload: str, size: int, loop_name: str, src: str | None) -> dict[str, Any]:
    """One measurement in this (fresh) process: wall seconds of the workload and its virtual end time."""
    if src is not None:
        _use_source_tree(src)
    import kbus  # noqa: F401 - imported before timing, like simpy below

    origin = sys.modules["kbus"].__file__
    if workload == "sleepers":
        _delays(size)
    gc.collect()
    if impl == "simpy":
        import simpy  # noqa: F401

        c0, t0 = time.process_time(), time.perf_counter()
        end = SIMPY[workload](size)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        fn = queue_pingpong if impl == "queue" else KBUS[workload]

        async def main() -> tuple[float, float, int]:
            c0, t0 = time.process_time(), time.perf_counter()
            end = await fn(size)
            return time.perf_counter() - t0, time.process_time() - c0, end

        wall, cpu, end = _run_loop(main, loop_name)
    return {"wall": wall, "cpu": cpu, "end": end, "kbus": origin}


# -------------------------------------------------------------------------- parent
def _measure(impl: str, workload: str, size: int, loop_name: str, src: str | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, workload, str(size), "--loop", loop_name]
    if src is not None:
        cmd += ["--src", src]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{impl} {workload} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every workload size")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what a measurement reports")
    parser.add_argument("--baseline-src", metavar="DIR", help="another kbus source tree to compare against")
    parser.add_argument("--only", nargs="*", choices=sorted(SIZES), help="run only these workloads")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "WORKLOAD", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, workload, size = args.child
        print(json.dumps(child(impl, workload, int(size), args.loop, args.src)))
        return

    baseline = args.baseline_src
    if baseline is not None and not (Path(baseline) / "kbus" / "__init__.py").is_file():
        raise SystemExit(f"--baseline-src {baseline}: no kbus/__init__.py there")
    workloads = args.only or list(SIZES)
    sizes = {w: max(1, int(SIZES[w] * args.scale)) for w in workloads}
    impls = ["kbus", "simpy"] + (["baseline"] if baseline else [])
    walls: dict[tuple[str, str], list[float]] = {}
    ceiling: list[float] = []
    for r in range(args.rounds):
        for w in workloads:
            order = impls[r % len(impls) :] + impls[: r % len(impls)]
            if w == "pingpong":
                order = [*order, "queue"]
            ends: dict[str, int] = {}
            for impl in order:
                src = baseline if impl == "baseline" else None
                res = _measure(impl, w, sizes[w], args.loop, src)
                if impl == "baseline" and not str(res["kbus"]).startswith(str(Path(baseline).resolve())):
                    raise SystemExit(f"baseline run imported kbus from {res['kbus']}, not from {baseline}")
                ends[impl] = res["end"]
                if impl == "queue":
                    ceiling.append(res[args.clock])
                else:
                    walls.setdefault((w, impl), []).append(res[args.clock])
            for impl in ("kbus", "baseline"):
                if impl in ends and ends[impl] != ends["simpy"]:
                    raise SystemExit(f"{w}: {impl} ended at {ends[impl]} ps, SimPy at {ends['simpy']} ps")
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    for w in workloads:
        k = walls[(w, "kbus")]
        vs_simpy = [s / t for s, t in zip(walls[(w, "simpy")], k, strict=True)]
        row = [w, f"{sizes[w]:,}", f"{statistics.median(k) * 1e3:.0f} ms", _spread(vs_simpy)]
        goal_simpy, goal_base = GOALS[w]
        goal = f">= {goal_simpy}x SimPy" if goal_simpy else ""
        if baseline:
            vs_base = [b / t for b, t in zip(walls[(w, "baseline")], k, strict=True)]
            row.append(_spread(vs_base))
            if goal_base:
                goal = f">= {goal_base}x baseline"
        row.append(goal)
        rows.append(row)
    if ceiling:
        k = walls[("pingpong", "kbus")]
        ratios = [c / t for c, t in zip(ceiling, k, strict=True)]
        row = ["ceiling: asyncio.Queue ping-pong, no time", f"{sizes['pingpong']:,}"]
        row += [f"{statistics.median(ceiling) * 1e3:.0f} ms", f"kbus/ceiling {_spread(ratios)}"]
        if baseline:
            row.append("")
        row.append("")
        rows.append(row)
    columns = ["workload", "size", f"kbus {args.clock} (median)", "SimPy / kbus: min / median / max"]
    if baseline:
        columns.append("baseline / kbus: min / median / max")
    columns.append("goal (median)")
    _print_table(
        f"engine: {args.rounds} interleaved rounds, kbus on {args.loop}, {args.clock} time, a fresh process per "
        f"run; virtual end times checked equal to SimPy's",
        columns,
        rows,
    )


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=180).print(table)


if __name__ == "__main__":
    main()
