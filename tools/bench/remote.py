"""Remote device benchmark: a device served by ``kbus serve`` against the same device in process.

Sections (all by default; name some to run only those):

``requests``  a host issuing single-PE ``PeDmaMsg`` probes (64 KiB reads, each to
              the next PE of ``default``) as fast as it can, ``--window`` of them in
              flight (and one at a time), to a device in this process and to the
              same config served by a ``kbus serve`` process over loopback (in
              lockstep, the default, and with ``connect_device(lockstep=False)``).
              Requests/s of each and the per-round ratio remote / in-process.
``upload``    a 64 MiB float32 tensor uploaded and read back (``await
              torch.tensor(a).numpy()``) on ``default``, remote and in process:
              wall time, the ratio, and the bytes that crossed the socket per
              tensor byte moved (upload plus readback; raw bytes cost 1.0).
``replay``    the demo workload recorded on ``default``, then replayed on its own
              config: wall time of the replay against the original run, and
              whether the replay was identical.

Rounds interleave the peers (in process, then remote, each round) and the
tables give the min/median/max of the per-round ratio.

Usage: ``python tools/bench/remote.py [requests|upload|replay ...] [--rounds N] [--window N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _table import print_table

import kbus
from kbus.demo import workload
from kbus.hw import build_device
from kbus.protocol import PeDmaMsg
from kbus.remote import connect_device, replay

PRESET = "default"


class Server:
    """A ``kbus serve`` process, as a user would start it."""

    def __init__(self, preset: str) -> None:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("KBUS_CONNECT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kbus", "serve", "--preset", preset, "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"ws://[\d.]+:\d+", line)
        if not match:
            raise RuntimeError(f"kbus serve printed {line!r}")
        self.url = match.group(0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _ratios(ratios: list[float]) -> list[str]:
    return [f"{min(ratios):.2f}x", f"{statistics.median(ratios):.2f}x", f"{max(ratios):.2f}x"]


async def _probes(dev: Any, n: int, window: int, tag: str) -> float:
    """Issue ``n`` PeDma probes, ``window`` in flight; returns requests per second (wall)."""
    t = dev.config.topology
    pes = [(s, c, p) for s in range(t.sips) for c in range(t.cubes_per_sip) for p in range(t.pes_per_cube)]
    hbm = dev.config.memory.hbm_base
    t0 = time.perf_counter()
    for start in range(0, n, window):
        batch = []
        for i in range(start, min(start + window, n)):
            s, c, p = pes[i % len(pes)]
            batch.append(dev.request(PeDmaMsg(tag, f"p{i}", s, c, p, hbm, 65536)))
        await asyncio.gather(*batch)
    return n / (time.perf_counter() - t0)


def bench_requests(server: Server, rounds: int, n: int, window: int) -> None:
    rows = []
    for w, lockstep in ((1, True), (window, True), (window, False)):
        local_rates, remote_rates, ratios = [], [], []
        for r in range(rounds):

            async def local(w: int = w, r: int = r) -> float:
                dev = build_device(kbus.Sim(), PRESET)
                try:
                    return await _probes(dev, n, w, f"l{r}.{w}")
                finally:
                    await dev.aclose()

            async def remote(w: int = w, r: int = r, lockstep: bool = lockstep) -> float:
                dev = await connect_device(server.url, lockstep=lockstep)
                try:
                    return await _probes(dev, n, w, f"r{r}.{w}")
                finally:
                    await dev.aclose()

            a = kbus.run(local)
            b = kbus.run(remote)
            local_rates.append(a)
            remote_rates.append(b)
            ratios.append(b / a)
        rows.append(
            [
                f"{w} in flight{'' if lockstep else ', lockstep off'}",
                f"{statistics.median(local_rates):,.0f}",
                f"{statistics.median(remote_rates):,.0f}",
                *_ratios(ratios),
            ]
        )
    print_table(
        f"requests/s: {n} single-PE PeDmaMsg probes on {PRESET!r}, in process vs served over loopback "
        f"({rounds} rounds, interleaved)",
        ["workload", "in process req/s", "remote req/s", "ratio min", "ratio median", "ratio max"],
        rows,
    )


def bench_upload(server: Server, rounds: int) -> None:
    data = np.random.default_rng(0).standard_normal(16 << 20).astype(np.float32)  # 64 MiB
    local_t, remote_t, ratios, per_byte = [], [], [], []

    async def roundtrip(target: str) -> tuple[float, float]:
        async with kbus.open_device(target) as torch:
            t0 = time.perf_counter()
            dev = torch.device
            before = getattr(dev, "bytes_sent", 0) + getattr(dev, "bytes_received", 0)
            back = await torch.tensor(data).numpy()
            wall = time.perf_counter() - t0
            moved = getattr(dev, "bytes_sent", 0) + getattr(dev, "bytes_received", 0) - before
            assert np.array_equal(back, data)
            return wall, moved / (2 * data.nbytes)

    for _ in range(rounds):
        a, _ = kbus.run(lambda: roundtrip(PRESET))
        b, socket_per_byte = kbus.run(lambda: roundtrip(server.url))
        local_t.append(a)
        remote_t.append(b)
        ratios.append(b / a)
        per_byte.append(socket_per_byte)
    print_table(
        f"64 MiB float32 tensor upload + readback on {PRESET!r} ({rounds} rounds, interleaved)",
        ["workload", "in process s", "remote s", "remote/in-process min", "median", "max", "socket bytes per byte"],
        [
            [
                "upload + readback",
                f"{statistics.median(local_t):.3f}",
                f"{statistics.median(remote_t):.3f}",
                *_ratios(ratios),
                f"{max(per_byte):.4f}",
            ]
        ],
    )


def bench_replay(rounds: int) -> None:
    orig_t, replay_t, ratios, identical = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.kbrec"

        async def original() -> None:
            async with kbus.open_device(PRESET, record=path) as torch:
                await workload(torch)

        for _ in range(rounds):
            t0 = time.perf_counter()
            kbus.run(original)
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = replay(path)
            b = time.perf_counter() - t0
            orig_t.append(a)
            replay_t.append(b)
            ratios.append(b / a)
            identical.append(result.identical)
        size = path.stat().st_size
    print_table(
        f"the demo on {PRESET!r}: recorded run vs its replay on the same config ({rounds} rounds, interleaved)",
        ["workload", "original s", "replay s", "replay/original min", "median", "max", "identical", "recording"],
        [
            [
                "kbus demo workload",
                f"{statistics.median(orig_t):.3f}",
                f"{statistics.median(replay_t):.3f}",
                *_ratios(ratios),
                "yes" if all(identical) else "NO",
                f"{size:,} B",
            ]
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=["requests", "upload", "replay"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="probes per round")
    parser.add_argument("--window", type=int, default=64, help="probes in flight in the pipelined run")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    runs: dict[str, Callable[[], Awaitable[None] | None]] = {}
    server = Server(PRESET) if {"requests", "upload"} & set(args.sections) else None
    try:
        if server is not None:
            runs["requests"] = lambda: bench_requests(server, args.rounds, args.requests, args.window)
            runs["upload"] = lambda: bench_upload(server, args.rounds)
        runs["replay"] = lambda: bench_replay(args.rounds)
        for section in args.sections:
            runs[section]()
    finally:
        if server is not None:
            server.close()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
