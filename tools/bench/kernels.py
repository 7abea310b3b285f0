"""Kernel language benchmark: wall time of real launches against numpy, batched and per instance.

Measures, on the ``default`` preset (64 PEs), warm launches (code deployed and
cached on every PE) of:

* **vector add**, 1M float32, BLOCK = 1024 (1024 instances, ``placement="owner"``);
* **tiled matmul** 512 x 512 x 512 float32 with the kernel of
  ``examples/32_tiled_matmul.py`` (32 x 32 tiles, K step 64, ``"spread"``);
* **row softmax** 4096 x 1024 float32 with the kernel of
  ``examples/31_row_softmax.py`` (one instance per row, ``"owner"``);

each with ``batch="auto"`` (a PE runs its instances as one batched run of the
body) and ``batch="off"`` (one instance at a time, the fallback path).

The named peer is numpy doing the same per-instance work in the same process:
the same blocks, one after another (``out[s] = x[s] + y[s]`` per 1024-slice;
the tile loop of ``kl.dot`` per output tile; one row's softmax per row). The
ratio is what emulating the kernel costs over the arithmetic itself: MMU
translation, DMA bookkeeping, the replay in virtual time, the network model.
The peer runs in the same round as each launch, and the table gives the
min / median / max of the per-round ratio (a shared machine moves sequential
measurements by up to 2x). Virtual times are printed, and checked equal
between the two modes.

Usage: ``python tools/bench/kernels.py [ROUNDS]`` (default 5).

``python tools/bench/kernels.py --base DIR [PAIRS]`` compares the
per-instance path with another kbus tree (``DIR`` holds its ``kbus``
package, e.g. ``git archive <commit> kbus | tar -x -C DIR``): PAIRS times
(default 3), a fresh interpreter on the base tree and one on this tree with
``KBUS_LANG_BATCH=off`` run the three launches (3 rounds each, numpy peer
interleaved), alternately, and the table gives this tree's wall over the
base's per pair (min / median / max) and the virtual times of both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _table import print_table

import kbus
import kbus.lang as kl

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), ROOT / "examples" / name)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@kbus.kernel
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: kl.constexpr):
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask=mask) + kl.load(y_ptr + offs, mask=mask), mask=mask)


def peer_add(x: np.ndarray, y: np.ndarray, out: np.ndarray, block: int) -> None:
    for s in range(0, x.size, block):
        out[s : s + block] = x[s : s + block] + y[s : s + block]


def peer_matmul(a: np.ndarray, b: np.ndarray, c: np.ndarray, bm: int, bn: int, bk: int) -> None:
    m, k = a.shape
    n = b.shape[1]
    for r in range(0, m, bm):
        for q in range(0, n, bn):
            acc = np.zeros((bm, bn), np.float32)
            for k0 in range(0, k, bk):
                acc += a[r : r + bm, k0 : k0 + bk] @ b[k0 : k0 + bk, q : q + bn]
            c[r : r + bm, q : q + bn] = acc


def peer_softmax(x: np.ndarray, out: np.ndarray) -> None:
    for r in range(x.shape[0]):
        row = x[r]
        e = np.exp(row - row.max())
        out[r] = e / e.sum()


Case = tuple[str, Callable[[str], Any], Callable[[], None], Callable[[], Any], Any]


async def measure(rounds: int) -> list[list[str]]:
    matmul = _example("32_tiled_matmul.py").matmul
    softmax = _example("31_row_softmax.py").softmax
    rng = np.random.default_rng(0)
    rows: list[list[str]] = []
    async with kbus.open_device("default") as torch:
        n = 1 << 20
        xh, yh = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        x, y, out = torch.tensor(xh), torch.tensor(yh), torch.empty(n, dtype=np.float32)
        out_np = np.empty_like(xh)

        s = 512
        ah = rng.standard_normal((s, s)).astype(np.float32)
        bh = rng.standard_normal((s, s)).astype(np.float32)
        a, b = torch.tensor(ah), torch.tensor(bh, policy=kbus.Replicate())
        c, c_np = torch.zeros(s, s, dtype=np.float32), np.empty((s, s), np.float32)

        sr, sc = 4096, 1024
        sh = rng.standard_normal((sr, sc)).astype(np.float32)
        sx, so, so_np = torch.tensor(sh), torch.empty(sr, sc, dtype=np.float32), np.empty((sr, sc), np.float32)
        for t in (x, y, out, a, b, c, sx, so):
            await t

        cases: list[Case] = [
            (
                "vector add 1M f32, BLOCK=1024",
                lambda mode: add[(n // 1024,)](x, y, out, n, BLOCK=1024, placement="owner", batch=mode),
                lambda: peer_add(xh, yh, out_np, 1024),
                lambda: np.array_equal(out_np, xh + yh),
                out,
            ),
            (
                "tiled matmul 512^3 f32 (ex. 32)",
                lambda mode: matmul[(s // 32, s // 32)](
                    a, b, c, s, s, s, BM=32, BN=32, BK=64, placement="spread", batch=mode
                ),
                lambda: peer_matmul(ah, bh, c_np, 32, 32, 64),
                lambda: np.allclose(c_np, ah @ bh, rtol=1e-4, atol=1e-3),
                c,
            ),
            (
                "row softmax 4096x1024 f32 (ex. 31)",
                lambda mode: softmax[(sr,)](sx, so, sc, sc, BLOCK=1024, placement="owner", batch=mode),
                lambda: peer_softmax(sh, so_np),
                lambda: np.allclose(so_np.sum(axis=1), 1.0, rtol=1e-4),
                so,
            ),
        ]
        for label, run, peer, check, target in cases:
            await run("auto")  # deploy + cache the code on every PE
            virt: dict[str, int] = {}
            results: dict[str, bytes] = {}
            for mode in ("auto", "off"):
                ratios, walls = [], []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    res = await run(mode)
                    wall = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    peer()
                    ratios.append(wall / (time.perf_counter() - t1))
                    walls.append(wall)
                virt[mode] = res.duration_ps
                results[mode] = (await target.numpy()).tobytes()
                rows.append(
                    [
                        label,
                        mode,
                        f"{statistics.median(walls) * 1e3:.1f} ms",
                        f"{min(ratios):.1f}x / {statistics.median(ratios):.1f}x / {max(ratios):.1f}x",
                        kbus.format_time(res.duration_ps),
                    ]
                )
            if not check():
                raise SystemExit(f"{label}: the numpy peer computed a wrong result")
            if virt["auto"] != virt["off"] or results["auto"] != results["off"]:
                raise SystemExit(f"{label}: batched and per-instance runs differ ({virt})")
    return rows


async def child(rounds: int) -> dict[str, Any]:
    """The three launches without naming a batch mode (a base tree has none): best wall and virtual time."""
    matmul = _example("32_tiled_matmul.py").matmul
    softmax = _example("31_row_softmax.py").softmax
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    async with kbus.open_device("default") as torch:
        n, s, sr, sc = 1 << 20, 512, 4096, 1024
        xh = rng.standard_normal(n).astype(np.float32)
        ah = rng.standard_normal((s, s)).astype(np.float32)
        sh = rng.standard_normal((sr, sc)).astype(np.float32)
        x, o = torch.tensor(xh), torch.empty(n, dtype=np.float32)
        a, b, c = torch.tensor(ah), torch.tensor(ah, policy=kbus.Replicate()), torch.zeros(s, s, dtype=np.float32)
        sx, so = torch.tensor(sh), torch.empty(sr, sc, dtype=np.float32)
        for t in (x, o, a, b, c, sx, so):
            await t
        runs: dict[str, Callable[[], Any]] = {
            "vector add": lambda: add[(n // 1024,)](x, x, o, n, BLOCK=1024, placement="owner"),
            "tiled matmul": lambda: matmul[(s // 32, s // 32)](a, b, c, s, s, s, BM=32, BN=32, BK=64),
            "row softmax": lambda: softmax[(sr,)](sx, so, sc, sc, BLOCK=1024, placement="owner"),
        }
        for name, run in runs.items():
            await run()
            walls = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                res = await run()
                walls.append(time.perf_counter() - t0)
            out[name] = (min(walls), res.duration_ps)
    return out


def compare(base: str, pairs: int) -> None:
    here = str(ROOT)
    script = str(Path(__file__).resolve())
    per: dict[str, list[float]] = {}
    virt: dict[str, tuple[int, int]] = {}
    for _ in range(pairs):
        got = []
        for tree, extra in ((base, {}), (here, {"KBUS_LANG_BATCH": "off"})):
            env = {**os.environ, "PYTHONPATH": tree, **extra}
            proc = subprocess.run(
                [sys.executable, script, "--child", "3"], env=env, capture_output=True, text=True, check=True, cwd="/"
            )
            got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for name in got[0]:
            per.setdefault(name, []).append(got[1][name][0] / got[0][name][0])
            virt[name] = (got[0][name][1], got[1][name][1])
    print_table(
        f"per-instance path: this tree (batch off) against {base}, {pairs} alternating pairs, best of 3 each",
        ["kernel", "wall, this / base: min / median / max", "virtual time base / this"],
        [
            [
                name,
                f"{min(r):.2f} / {statistics.median(r):.2f} / {max(r):.2f}",
                f"{kbus.format_time(virt[name][0])} / {kbus.format_time(virt[name][1])}",
            ]
            for name, r in per.items()
        ],
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(kbus.run(child, int(sys.argv[2]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--base":
        compare(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rows = kbus.run(measure, rounds)
    print_table(
        f"kernel launches on 'default' (64 PEs), warm; numpy peer interleaved, {rounds} rounds",
        ["kernel", "batch", "wall (median)", "vs numpy: min / median / max", "virtual time"],
        rows,
    )


if __name__ == "__main__":
    main()
