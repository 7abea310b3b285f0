"""Runtime benchmark: a sharded elementwise add of a 64 MiB float32 tensor over 64 PEs.

``a`` and ``b`` (16 Mi float32 each) are sharded by rows over the 64 PEs of
the ``default`` preset (1 MiB, i.e. 16 whole pages, per PE, so VA-contiguous)
and already resident. One iteration is ``c = a + b; await c``: allocate and map
``c`` (one broadcast MmuMapMsg of 64 entries), one KernelLaunchMsg fanned out
to the 64 PEs, each reading its two local shards, adding and writing its shard
of ``c``. The free of ``c`` runs outside the timed region.

The same add runs in numpy in the same process as the peer (roadmap goal:
kbus within 20x of numpy). The table also gives the virtual time one add takes
on the device, and how many times each byte moved by DMA is copied in host
memory (counted by wrapping the byte store's read/write methods).

Usage: ``python tools/bench/runtime.py [MiB] [repeats]`` (defaults 64 and 5).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _table import best_of, print_table

import kbus
from kbus.mem import MemoryStore
from kbus.sim.units import format_time

MiB = 1 << 20


class CopyCounter:
    """Counts bytes copied by the device's byte stores (every DMA read/write lands in one of these)."""

    def __init__(self) -> None:
        self.read = 0
        self.written = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CopyCounter:
        counter = self
        orig_read, orig_read_into, orig_write = MemoryStore.read, MemoryStore.read_into, MemoryStore.write
        self._saved = {"read": orig_read, "read_into": orig_read_into, "write": orig_write}

        def read(store: MemoryStore, addr: int, nbytes: int) -> Any:
            counter.read += nbytes
            return orig_read(store, addr, nbytes)

        def read_into(store: MemoryStore, addr: int, out: Any) -> None:
            counter.read += out.nbytes
            orig_read_into(store, addr, out)

        def write(store: MemoryStore, addr: int, data: Any) -> None:
            counter.written += np.asarray(data).nbytes
            orig_write(store, addr, data)

        MemoryStore.read = read  # type: ignore[method-assign]
        MemoryStore.read_into = read_into  # type: ignore[method-assign]
        MemoryStore.write = write  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(MemoryStore, name, fn)


async def kbus_run(nbytes: int, repeat: int, op: Callable[[Any, Any], Any]) -> dict[str, Any]:
    n = nbytes // 4
    x = np.random.default_rng(0).random(n, dtype=np.float32)
    y = np.random.default_rng(1).random(n, dtype=np.float32)
    async with kbus.open_device("default") as torch:
        a = torch.tensor(x, policy=kbus.Shard(dim=0))
        b = torch.tensor(y, policy=kbus.Shard(dim=0))
        await a
        await b
        assert a.va_contiguous and len(a.shards) == torch.config.num_pes
        best, virt = float("inf"), 0
        for _ in range(repeat):
            gc.collect()
            v0 = torch.now_ps
            t0 = time.perf_counter()
            c = op(a, b)
            await c
            best = min(best, time.perf_counter() - t0)
            virt = torch.now_ps - v0
            del c
            await torch.synchronize()
        with CopyCounter() as copies:
            c = op(a, b)
            await c
        got = await c.numpy()
        if not np.array_equal(got, op(x, y)):
            raise SystemExit("kbus result differs from numpy")
    return {"wall": best, "virtual": virt, "copied": copies.read + copies.written}


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    nbytes = mib * MiB
    n = nbytes // 4
    x = np.random.default_rng(0).random(n, dtype=np.float32)
    y = np.random.default_rng(1).random(n, dtype=np.float32)
    cases: list[tuple[str, Callable[[Any, Any], Any], int]] = [
        ("a + b", lambda a, b: a + b, 3 * nbytes),  # DMA: read a, read b, write c
        ("a * 2.0", lambda a, b: a * 2.0, 2 * nbytes),  # DMA: read a, write c
    ]
    rows = []
    for label, op, moved in cases:
        t_np, _ = best_of(lambda op=op: op(x, y), repeat=repeat)
        res = kbus.run(kbus_run, nbytes, repeat, op)
        rows.append(
            [
                label,
                f"{t_np * 1e3:.1f} ms",
                f"{res['wall'] * 1e3:.1f} ms",
                f"{res['wall'] / t_np:.1f}x",
                format_time(res["virtual"]),
                f"{moved / MiB:.0f} MiB",
                f"{res['copied'] / moved:.2f}",
            ]
        )
    print_table(
        f"runtime: {mib} MiB float32, Shard(dim=0) over 64 PEs (default preset), best of {repeat}",
        ["op", "numpy", "kbus", "ratio", "virtual", "DMA bytes", "copies/byte"],
        rows,
    )
    print(
        "host copies per DMA byte: bytes the device's byte stores copy (one per DMA read into a fresh "
        "buffer, one per DMA write into the store) divided by the bytes DMA moves; the kernel computes "
        "in place into its first input's read buffer, so the arithmetic adds no copy."
    )


if __name__ == "__main__":
    main()
