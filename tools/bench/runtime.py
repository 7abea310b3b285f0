"""Runtime benchmark: kbus tensor operations against numpy, interleaved round by round.

Sections (all by default; name some to run only those):

``sweep``   ``c = a + b`` of float32 tensors from 4 KiB to 256 MiB, ``Shard(dim=0)``
            over the 64 PEs of ``default`` (tensors below 64 pages use fewer
            shards, one per page at most; a last row repeats 4 KiB with
            ``Shard(dim=0, min_bytes=0)``, one 64-byte shard on every PE). Each
            round runs numpy's add and then kbus's on the same size; the table
            gives the shards, the device memory ``c`` holds, both medians, the
            min/median/max of the per-round ratio kbus/numpy and the virtual time
            of one add. Also written as CSV (``--csv``, default ``runtime_sweep.csv``).
``scale``   sharded create + add + free (``a = ones(n); b = ones(n); c = a + b;
            await c; free all; synchronize``) with one 4 KiB shard per PE
            (``Shard(dim=0, min_bytes=0)``: the default would use one PE in 16) on
            8, 64, 1024 and 4096 PEs (the ``large`` preset's memory and timing,
            topology overridden), plus the device build and close. The peer is the
            same program in numpy, timed in the same rounds. ``step`` is the growth
            of the median from the previous PE count: linear cost per operation
            means ``step <= PEs ratio`` (8x for 8->64, 16x for 64->1024, 4x for 1024->4096).
``matmul``  512 and 2048 square float32 ``a @ b`` on ``default``, ``a`` row-sharded,
            ``b`` replicated or column-sharded (remote reads), against numpy's matmul.
``build``   building and closing ``large`` (4096 PEs) with the collector running
            (the peer: ``Device(...)`` built directly), paused (``build_device``)
            and paused + frozen (``build_device(freeze=True)``, as ``open_device``
            does, closed with the collector paused, then unfrozen), interleaved.
``memory``  in fresh subprocesses: peak RSS of a 256 MiB upload + readback round
            trip in host copies per byte beyond the user's array (the result
            array included), host bytes copied per byte moved by kind (upload
            snapshot, byte-store writes, byte-store reads), and the peak RSS of
            ``kbus demo``.

Usage: ``python tools/bench/runtime.py [sweep|scale|matmul|build|memory ...] [--rounds N] [--csv PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _table import print_table

import kbus
from kbus.hw import DeviceConfig
from kbus.mem import MemoryStore
from kbus.runtime.transfer import HostTransfers
from kbus.sim.units import format_time

KiB = 1 << 10
MiB = 1 << 20
SIZES = [4 * KiB * 4**k for k in range(9)]  # 4 KiB .. 256 MiB
TOPOLOGIES = {8: (1, 1, 8), 64: (2, 4, 8), 1024: (2, 16, 32), 4096: (8, 16, 32)}


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def atimed(fn: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


# -- sweep ----------------------------------------------------------------------------------------


async def sweep(rounds: int, csv_path: Path) -> None:
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    cases = [(nbytes, kbus.Shard(dim=0)) for nbytes in SIZES] + [(SIZES[0], kbus.Shard(dim=0, min_bytes=0))]
    async with kbus.open_device("default") as torch:
        for nbytes, policy in cases:
            n = nbytes // 4
            x = np.random.default_rng(0).random(n, dtype=np.float32)
            y = np.random.default_rng(1).random(n, dtype=np.float32)
            a = torch.tensor(x, policy=policy)
            b = torch.tensor(y, policy=policy)
            await a
            await b
            t_np: list[float] = []
            t_kb: list[float] = []
            virtual = 0
            for _ in range(rounds):
                gc.collect()
                t_np.append(timed(lambda x=x, y=y: np.add(x, y)))
                v0 = torch.now_ps
                t0 = time.perf_counter()
                c = a + b
                await c
                t_kb.append(time.perf_counter() - t0)
                virtual = torch.now_ps - v0
                c.free()
                await torch.synchronize()
            held = torch.memory_stats().used
            c = a + b
            if not np.array_equal(await c.numpy(), x + y):
                raise SystemExit(f"kbus a + b differs from numpy at {size_label(nbytes)}")
            held = torch.memory_stats().used - held
            shards = len(c.shards)
            for t in (a, b, c):
                t.free()
            await torch.synchronize()
            ratios = [k / p for k, p in zip(t_kb, t_np, strict=True)]
            rows.append(
                [
                    size_label(nbytes) + ("" if policy.min_bytes is None else " min_bytes=0"),
                    str(shards),
                    size_label(held),
                    ms(statistics.median(t_np)),
                    ms(statistics.median(t_kb)),
                    spread(ratios),
                    format_time(virtual),
                ]
            )
            records.append(
                {
                    "bytes": nbytes,
                    "min_bytes": "page" if policy.min_bytes is None else policy.min_bytes,
                    "shards": shards,
                    "held_bytes": held,
                    "numpy_median_s": statistics.median(t_np),
                    "kbus_median_s": statistics.median(t_kb),
                    "ratio_min": min(ratios),
                    "ratio_median": statistics.median(ratios),
                    "ratio_max": max(ratios),
                    "virtual_ps": virtual,
                }
            )
    print_table(
        f"a + b, float32, Shard(dim=0) over 64 PEs (default), {rounds} interleaved rounds",
        ["size", "shards", "c holds", "numpy", "kbus", "kbus/numpy min/med/max", "virtual"],
        rows,
    )
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print(f"CSV: {csv_path}")


# -- scale ----------------------------------------------------------------------------------------


def config_for(pes: int) -> DeviceConfig:
    s, c, p = TOPOLOGIES[pes]
    cols = max(k for k in range(1, c + 1) if c % k == 0 and k * k <= c)  # the squarest torus grid of c cubes
    return DeviceConfig.load("large").with_overrides(
        {"topology.sips": s, "topology.cubes_per_sip": c, "topology.pes_per_cube": p, "topology.cube_cols": cols}
    )


async def scale_round(cfg: DeviceConfig, n: int) -> tuple[float, float, float]:
    """One round: (build, create + add + free, close) wall seconds."""
    t0 = time.perf_counter()
    session = kbus.open_device(cfg)
    torch = await session.__aenter__()
    t1 = time.perf_counter()
    try:
        one_per_pe = kbus.Shard(dim=0, min_bytes=0)  # 4 KiB is below a page: keep a shard on every PE
        a = torch.ones(n, policy=one_per_pe)
        b = torch.ones(n, policy=one_per_pe)
        c = a + b
        await c
        assert len(c.shards) == cfg.num_pes
        for t in (a, b, c):
            t.free()
        await torch.synchronize()
        t2 = time.perf_counter()
    finally:
        await session.__aexit__(None, None, None)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


async def scale(rounds: int) -> None:
    rows = []
    prev: float | None = None
    per_pe = 1024  # float32 elements per shard (4 KiB)
    for pes in TOPOLOGIES:
        cfg = config_for(pes)
        n = pes * per_pe
        builds, ops, closes, t_np = [], [], [], []
        for _ in range(rounds):
            gc.collect()
            t_np.append(timed(lambda n=n: np.add(np.ones(n, np.float32), np.ones(n, np.float32))))
            build, op, close = await scale_round(cfg, n)
            builds.append(build)
            ops.append(op)
            closes.append(close)
        med = statistics.median(ops)
        step = "" if prev is None else f"{med / prev:.2f}x"
        prev = med
        ratios = [k / p for k, p in zip(ops, t_np, strict=True)]
        rows.append(
            [
                str(pes),
                ms(statistics.median(builds)),
                f"{ms(min(ops))} / {ms(med)} / {ms(max(ops))}",
                step,
                ms(statistics.median(closes)),
                ms(statistics.median(t_np)),
                spread(ratios),
            ]
        )
    print_table(
        f"sharded create + add + free, 4 KiB per PE, {rounds} rounds (build and close timed separately)",
        ["PEs", "build", "kbus min/med/max", "step", "close", "numpy", "kbus/numpy min/med/max"],
        rows,
    )


# -- matmul ---------------------------------------------------------------------------------------


async def matmul(rounds: int) -> None:
    rows = []
    async with kbus.open_device("default") as torch:
        for size in (512, 2048):
            rng = np.random.default_rng(size)
            x = rng.random((size, size), dtype=np.float32)
            y = rng.random((size, size), dtype=np.float32)
            a = torch.tensor(x, policy=kbus.Shard(dim=0))
            for label, policy in (("replicated", kbus.Replicate()), ("sharded dim 1", kbus.Shard(dim=1))):
                b = torch.tensor(y, policy=policy)
                await b
                await a
                t_np, t_kb = [], []
                virtual = 0
                for _ in range(rounds):
                    gc.collect()
                    t_np.append(timed(lambda x=x, y=y: np.matmul(x, y)))
                    v0 = torch.now_ps
                    t0 = time.perf_counter()
                    c = a @ b
                    await c
                    t_kb.append(time.perf_counter() - t0)
                    virtual = torch.now_ps - v0
                    c.free()
                    await torch.synchronize()
                c = a @ b
                if not np.allclose(await c.numpy(), x @ y, rtol=1e-4, atol=1e-3):
                    raise SystemExit(f"kbus matmul {size} ({label}) differs from numpy")
                c.free()
                b.free()
                await torch.synchronize()
                ratios = [k / p for k, p in zip(t_kb, t_np, strict=True)]
                rows.append(
                    [
                        f"{size}x{size} @ {label}",
                        ms(statistics.median(t_np)),
                        ms(statistics.median(t_kb)),
                        spread(ratios),
                        format_time(virtual),
                    ]
                )
            a.free()
    print_table(
        f"a @ b, float32, a Shard(dim=0) over 64 PEs (default), compute.host_threads=1, {rounds} rounds",
        ["case", "numpy", "kbus", "kbus/numpy min/med/max", "virtual"],
        rows,
    )


# -- build --------------------------------------------------------------------------------------


async def build(rounds: int) -> None:
    from kbus.hw import build_device
    from kbus.hw.device import Device

    cfg = DeviceConfig.load("large")
    modes = ("collector running", "paused", "paused + frozen")
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            gc.collect()
            t0 = time.perf_counter()
            if mode == "collector running":
                dev = Device(kbus.Sim(), cfg, wire=False)
            else:
                dev = build_device(kbus.Sim(), cfg, freeze=mode == "paused + frozen")
            t1 = time.perf_counter()
            if mode == "paused + frozen":
                gc.disable()
                try:
                    await dev.aclose()
                finally:
                    gc.enable()
                    gc.unfreeze()
            else:
                await dev.aclose()
            times[mode].append((t1 - t0, time.perf_counter() - t1))
            del dev
    base = times["collector running"]
    rows = []
    for mode in modes:
        b = [t[0] for t in times[mode]]
        c = [t[1] for t in times[mode]]
        ratio = [x[0] / y[0] for x, y in zip(times[mode], base, strict=True)]
        rows.append(
            [mode, f"{ms(min(b))} / {ms(statistics.median(b))} / {ms(max(b))}", ms(statistics.median(c)), spread(ratio)]
        )
    print_table(
        f"build and close of 'large' (4096 PEs), {rounds} interleaved rounds",
        ["collector", "build min/med/max", "close", "build / running min/med/max"],
        rows,
    )


# -- memory (subprocesses) --------------------------------------------------------------------------


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * KiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_roundtrip(mib: int) -> None:
    """Print peak RSS of one upload + readback, in copies of the array beyond the user's own."""
    nbytes = mib * MiB

    async def run() -> None:
        async with kbus.open_device("default") as torch:
            x = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
            base = _peak_rss()
            y = await torch.tensor(x).numpy()
            peak = _peak_rss()
            assert np.array_equal(x, y)
            print(f"{(peak - base) / nbytes:.3f}")

    kbus.run(run)


class CopyCounter:
    """Host bytes copied, by kind: upload snapshots, byte-store writes, byte-store reads."""

    def __init__(self) -> None:
        self.counts = {"snapshot": 0, "store write": 0, "store read": 0}
        self._saved: dict[tuple[type, str], Any] = {}

    def _wrap(self, cls: type, name: str, key: str, size: Callable[..., int]) -> None:
        orig = getattr(cls, name)
        self._saved[(cls, name)] = orig
        counts = self.counts

        def wrapper(*args: Any) -> Any:
            result = orig(*args)
            counts[key] += size(*args, result)
            return result

        setattr(cls, name, wrapper)

    def __enter__(self) -> CopyCounter:
        self._wrap(HostTransfers, "storage_bytes", "snapshot", lambda _s, arr, _st, out: out.nbytes)
        self._wrap(MemoryStore, "write", "store write", lambda _s, _a, data, _r: np.asarray(data).nbytes)
        self._wrap(MemoryStore, "read", "store read", lambda _s, _a, n, _r: n)
        self._wrap(MemoryStore, "read_into", "store read", lambda _s, _a, out, _r: out.nbytes)
        return self

    def __exit__(self, *exc: object) -> None:
        for (cls, name), fn in self._saved.items():
            setattr(cls, name, fn)


def child_copies(mib: int) -> None:
    nbytes = mib * MiB

    async def run() -> None:
        async with kbus.open_device("default") as torch:
            x = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
            with CopyCounter() as counter:
                y = await torch.tensor(x).numpy()
            assert np.array_equal(x, y)
            print(" ".join(f"{k.replace(' ', '_')}={v / nbytes:.3f}" for k, v in counter.counts.items()))

    kbus.run(run)


def child_demo(_mib: int) -> None:
    """Print the peak RSS (bytes) and wall time of ``kbus demo`` on ``default``, run in this process."""
    from kbus.demo import run_demo

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_demo("default")
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit("kbus demo failed")
    print(_peak_rss(), f"{wall:.3f}")


def run_child(*args: str) -> str:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


def memory() -> None:
    rows = []
    peak = float(run_child("roundtrip", "256"))
    rows.append(["256 MiB upload + readback: peak RSS beyond the user's array", f"{peak:.2f} copies per byte"])
    copies = dict(kv.split("=") for kv in run_child("copies", "256").split())
    for key, value in copies.items():
        rows.append([f"256 MiB round trip: host bytes copied per byte, {key.replace('_', ' ')}", value])
    rss, wall = run_child("demo", "0").split()
    rows.append(["kbus demo (default): peak RSS of the whole process", f"{int(rss) / MiB:.0f} MiB"])
    rows.append(["kbus demo (default): wall time in the process", f"{float(wall):.2f} s"])
    print_table("host memory (fresh subprocesses)", ["measure", "value"], rows)
    print(
        "The result array counts in the round trip's peak (it is one copy); a byte-store write is the "
        "device memory itself, a byte-store read the copy a DMA read makes."
    )


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, mib = sys.argv[2], int(sys.argv[3])
        {"roundtrip": child_roundtrip, "copies": child_copies, "demo": child_demo}[kind](mib)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help="sweep, scale, matmul, memory (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (default 5)")
    parser.add_argument("--csv", type=Path, default=Path("runtime_sweep.csv"), help="where the sweep CSV goes")
    args = parser.parse_args()
    known = ["sweep", "scale", "matmul", "build", "memory"]
    sections = args.sections or known
    for name in sections:
        if name not in known:
            parser.error(f"unknown section {name!r}; choose from {', '.join(known)}")
    if "sweep" in sections:
        kbus.run(lambda: sweep(args.rounds, args.csv))
    if "scale" in sections:
        kbus.run(lambda: scale(max(1, min(args.rounds, 3))))
    if "matmul" in sections:
        kbus.run(lambda: matmul(args.rounds))
    if "build" in sections:
        kbus.run(lambda: build(args.rounds))
    if "memory" in sections:
        memory()


if __name__ == "__main__":
    main()
