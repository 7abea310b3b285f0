"""Workloads on the real device for the tracing tests and the tracing benchmark's peers.

Everything here drives the product as a user would: protocol messages through
``Device.request``, or tensors and a kernel through ``kbus.open_device``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

import kbus
import kbus.lang as kl
from kbus import Sim
from kbus.hw import Device, DeviceConfig, build_device
from kbus.protocol import HostMessage, MapEntry, MemoryWriteMsg, MmuMapMsg, PeDmaMsg


def device_config(sips: int = 1, cubes: int = 2, pes: int = 2) -> DeviceConfig:
    """The ``tiny`` preset resized (smaller devices make smaller, faster traces)."""
    return DeviceConfig.load("tiny").with_overrides(
        {"topology.sips": sips, "topology.cubes_per_sip": cubes, "topology.pes_per_cube": pes}
    )


def make_device(sips: int = 1, cubes: int = 2, pes: int = 2) -> Device:
    """A fresh device on a fresh Sim (call inside a running loop)."""
    return build_device(Sim(), device_config(sips, cubes, pes))


def make_request(dev: Device, i: int, maps: bool = True) -> HostMessage:
    """Request ``i`` of the standard mix: PE DMA reads and writes round-robin over every PE,
    a broadcast pattern write every 8th, and a broadcast MMU map every 16th (each its own VA;
    ``maps=False`` leaves them out, for devices whose VA space a runtime owns)."""
    coords = [node.coord for node in dev.iter_pes()]
    mem = dev.config.memory
    s, c, p = coords[i % len(coords)]
    if i % 16 == 11 and maps:
        entry = MapEntry(mem.va_base + i * mem.page_size, mem.hbm_base, mem.page_size, s, c, p)
        return MmuMapMsg("t", f"m{i}", (entry,))
    if i % 8 == 7:
        return MemoryWriteMsg("t", f"w{i}", s, c, p, mem.hbm_base, 8192, pattern="zeros")
    return PeDmaMsg("t", f"d{i}", s, c, p, mem.hbm_base, 4096, is_write=bool(i & 1))


async def run_workload(dev: Device, requests: int = 100, window: int = 8, first: int = 0, *, maps: bool = True) -> int:
    """Requests ``first .. first+requests-1`` of the mix, ``window`` in flight; returns the final virtual time."""

    async def worker(w: int) -> None:
        for i in range(first + w, first + requests, window):
            await dev.request(make_request(dev, i, maps))

    await asyncio.gather(*(worker(w) for w in range(window)))
    return int(dev.sim.now)


@kbus.kernel
def _scale(x_ptr: Any, out_ptr: Any, n: Any, BLOCK: kl.constexpr) -> None:
    offs = kl.program_id(0) * BLOCK + kl.arange(0, BLOCK)
    mask = offs < n
    kl.store(out_ptr + offs, kl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


async def runtime_workload(torch: Any, n: int = 4096) -> None:
    """Tensors (allocator ``mem`` events, MMU maps), a kernel (``kernel`` events) and a readback."""
    x = torch.arange(n, dtype=np.float32, policy=kbus.Shard(dim=0))
    out = torch.empty(n, dtype=np.float32, policy=kbus.Shard(dim=0))
    await _scale[(kl.cdiv(n, 512),)](x, out, n, BLOCK=512)
    got = await (out + 1.0).numpy()
    assert np.array_equal(got, np.arange(n, dtype=np.float32) * 2 + 1)
