"""10 — Drive the device by protocol messages.

What this shows, in order:

1. build a device on a virtual-time engine (``build_device(kbus.Sim(), "tiny")``);
2. register host buffers, then ``MemoryWriteMsg`` (host buffer -> a PE's HBM)
   and ``MemoryReadMsg`` (HBM -> host buffer) round-trip real bytes;
3. ``PeDmaMsg``: a PE's DMA engine reads HBM; ``ResponseMsg.value`` carries
   how long it took in device time (picoseconds);
4. ``MmuMapMsg`` without targets broadcasts to every PE: one response per PE;
5. a bad request fails with ``kbus.DeviceError`` whose ``responses`` name the
   PE and the reason; the simulation keeps running afterwards.

Everything here is the host<->device protocol of ``kbus.protocol``: this is the
level a driver or runtime engineer works at. Run: ``python examples/10_messages.py``.
"""

from __future__ import annotations

import numpy as np

import kbus
from kbus.hw import build_device
from kbus.protocol import MapEntry, MemoryReadMsg, MemoryWriteMsg, MmuMapMsg, PeDmaMsg


async def main() -> None:
    dev = build_device(kbus.Sim(), "tiny")  # 1 SIP x 2 cubes x 4 PEs
    topo, mem = dev.config.topology, dev.config.memory
    print(f"device {dev.config.name!r}: {topo.sips} SIP x {topo.cubes_per_sip} cubes x {topo.pes_per_cube} PEs")

    # --- 2. host buffer -> HBM of sip0.cube1.pe3 -> another host buffer -----------------
    data = np.arange(8192, dtype=np.uint8)
    back = np.zeros_like(data)
    dev.register_host_buffer("data", data)  # used in place, never copied
    dev.register_host_buffer("back", back)
    one_pe = {"target_cubes": (1,), "target_pe": 3}  # the seed defaults ("all") would broadcast
    t0 = dev.sim.now
    await dev.request(
        MemoryWriteMsg(
            "ex10", "write", 0, 1, 3, mem.hbm_base, data.nbytes,
            src_kind="host_buffer_ref", host_buffer="data", **one_pe,
        )
    )  # fmt: skip
    await dev.request(MemoryReadMsg("ex10", "read", 0, 1, 3, mem.hbm_base, data.nbytes, host_buffer="back", **one_pe))
    assert np.array_equal(back, data)
    print(f"wrote and read back {data.nbytes} bytes in {kbus.format_time(dev.sim.now - t0)} of device time")

    # --- 3. a PE's DMA engine reads 64 KiB of its HBM; value = its duration -----------
    (resp,) = await dev.request(PeDmaMsg("ex10", "dma", 0, 1, 3, mem.hbm_base, 64 * 1024))
    assert resp.success and isinstance(resp.value, int)
    print(
        f"PeDma 64 KiB read on sip{resp.src_sip}.cube{resp.src_cube}.pe{resp.src_pe}: "
        f"{kbus.format_time(resp.value)} (device clock now {kbus.format_time(dev.sim.now)})"
    )

    # --- 4. one MmuMap message, mapped on every PE by the fabric's broadcast ---------
    va = mem.va_base
    responses = await dev.request(MmuMapMsg("ex10", "map", (MapEntry(va, mem.hbm_base, 64 * 1024, 0, 1, 3),)))
    print(f"MmuMap broadcast: {len(responses)} responses, all ok: {all(r.success for r in responses)}")
    (seg,) = dev.pe(0, 0, 0).mmu.translate(va, 4096)  # any PE can now translate the range
    print(f"  sip0.cube0.pe0 translates va {va:#x} -> pa {seg.pa:#x} owned by sip{seg.sip}.cube{seg.cube}.pe{seg.pe}")

    # --- 5. a failed request: DeviceError names the PE and the reason ----------------
    try:
        await dev.request(PeDmaMsg("ex10", "bad", 0, 1, 3, 0xDEAD_0000_0000, 4096))
    except kbus.DeviceError as err:
        (bad,) = err.responses
        print(f"DeviceError: {err}")
        print(f"  response from sip{bad.src_sip}.cube{bad.src_cube}.pe{bad.src_pe}: success={bad.success}")
    else:
        raise AssertionError("the bad DMA should have failed")

    # the device is still usable after a failed request
    (resp,) = await dev.request(PeDmaMsg("ex10", "again", 0, 0, 0, mem.hbm_base, 4096))
    assert resp.success
    await dev.aclose()


if __name__ == "__main__":
    kbus.run(main)
