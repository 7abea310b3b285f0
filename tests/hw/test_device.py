"""The device end to end: every seed message, routing, errors, timing, wire mode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import kbus
from kbus import DeviceError, Sim
from kbus.hw import Device, build_device
from kbus.hw.probe import expected_dma_ps, expected_round_trip_ps, probe
from kbus.protocol import (
    KernelLaunchMsg,
    KernelRef,
    MapEntry,
    MemoryReadMsg,
    MemoryWriteMsg,
    MmuMapMsg,
    MmuUnmapMsg,
    PeDmaMsg,
    UnmapEntry,
)

VA = 0x1000_0000_0000


async def make(preset: str = "tiny", wire: bool | None = None) -> Device:
    return build_device(Sim(), preset, wire=wire)


@pytest.mark.asyncio
@pytest.mark.parametrize(("preset", "wire"), [("tiny", False), ("default", False), ("tiny", True), ("default", True)])
async def test_every_seed_message_end_to_end(preset: str, wire: bool) -> None:
    dev = await make(preset, wire=wire)
    cfg = dev.config
    topo = cfg.topology
    last_sip, last_cube, last_pe = topo.sips - 1, topo.cubes_per_sip - 1, topo.pes_per_cube - 1
    hbm = cfg.memory.hbm_base
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    dev.register_host_buffer("src", src)
    dev.register_host_buffer("dst", dst)
    unicast = {"target_cubes": (last_cube,), "target_pe": last_pe}
    w = MemoryWriteMsg(
        "c", "w", last_sip, last_cube, last_pe, hbm, 4096, src_kind="host_buffer_ref", host_buffer="src", **unicast
    )
    (resp,) = await dev.request(w)
    assert resp.success and (resp.src_sip, resp.src_cube, resp.src_pe) == (last_sip, last_cube, last_pe)
    await dev.request(MemoryReadMsg("c", "r", last_sip, last_cube, last_pe, hbm, 4096, host_buffer="dst", **unicast))
    assert np.array_equal(src, dst)
    # pattern fill broadcast to every PE of SIP 0
    fill = await dev.request(MemoryWriteMsg("c", "f", 0, 0, 0, 0x100, 8, pattern="0xDEADBEEF"))
    assert len(fill) == topo.cubes_per_sip * topo.pes_per_cube
    await dev.request(MemoryReadMsg("c", "r2", 0, last_cube, last_pe, 0x100, 8, host_buffer="dst", **unicast))
    assert dst[:8].tobytes() == bytes.fromhex("efbeadde" * 2)
    # PeDma read and write
    (r,) = await dev.request(PeDmaMsg("c", "d", last_sip, last_cube, last_pe, hbm, 256, is_write=True))
    assert r.success and r.value == expected_dma_ps(cfg, "write", 256)
    # MMU map broadcast to every PE of every SIP, then translate anywhere
    entry = MapEntry(VA, hbm, cfg.memory.page_size, last_sip, last_cube, last_pe)
    maps = await dev.request(MmuMapMsg("c", "m", (entry,)))
    assert len(maps) == topo.sips * topo.cubes_per_sip * topo.pes_per_cube
    for node in dev.iter_pes():
        (seg,) = node.mmu.translate(VA + 16, 32)
        assert (seg.sip, seg.cube, seg.pe, seg.pa) == (last_sip, last_cube, last_pe, hbm + 16)
    data = await dev.read_va((0, 0, 0), VA, 16)
    assert data.tobytes() == bytes(range(16))
    # kernel launch (builtin nop) everywhere
    launches = await dev.request(KernelLaunchMsg("c", "k", KernelRef("nop", "builtin"), ()))
    assert len(launches) == topo.sips * topo.cubes_per_sip * topo.pes_per_cube
    # unmap everywhere
    unmaps = await dev.request(MmuUnmapMsg("c", "u", (UnmapEntry(VA, cfg.memory.page_size),)))
    assert len(unmaps) == len(maps)
    with pytest.raises(kbus.KbusError, match=r"sip0\.cube0\.pe0.*0x100000000000"):
        dev.pes[0][0][0].mmu.translate(VA, 8)
    assert dev.orphans == []
    await dev.aclose()


@pytest.mark.asyncio
async def test_large_preset_broadcast_map() -> None:
    dev = await make("large")
    assert dev.config.num_pes == 4096
    maps = await dev.request(MmuMapMsg("c", "m", (MapEntry(VA, 0, 1 << 16, 7, 15, 31),)))
    assert len(maps) == 4096 and all(r.success for r in maps)
    # fan-out happened in the fabric: one host message, one SIP forward per other SIP
    assert dev.host_links[0].messages == 1
    assert sum(dev.io_cpus[0].sip_links[s].messages for s in range(1, 8)) == 7
    # unicast traffic at the far corner of the device
    hbm = dev.config.memory.hbm_base
    buf = np.arange(512, dtype=np.uint8)
    back = np.zeros(512, dtype=np.uint8)
    dev.register_host_buffer("buf", buf)
    dev.register_host_buffer("back", back)
    far = {"target_cubes": (15,), "target_pe": 31}
    await dev.request(
        MemoryWriteMsg("c", "w", 7, 15, 31, hbm, 512, src_kind="host_buffer_ref", host_buffer="buf", **far)
    )
    await dev.request(MemoryReadMsg("c", "r", 7, 15, 31, hbm, 512, host_buffer="back", **far))
    assert np.array_equal(buf, back)
    (r,) = await dev.request(PeDmaMsg("c", "d", 7, 15, 31, hbm, 4096))
    assert r.value == expected_dma_ps(dev.config, "read", 4096)
    launches = await dev.request(KernelLaunchMsg("c", "k", KernelRef("nop", "builtin"), (), target_sips=(6, 7)))
    assert len(launches) == 2 * 16 * 32
    unmaps = await dev.request(MmuUnmapMsg("c", "u", (UnmapEntry(VA, 1 << 16),)))
    assert len(unmaps) == 4096
    await dev.aclose()


@pytest.mark.asyncio
async def test_bad_requests_fail_with_reasons_and_device_keeps_serving() -> None:
    dev = await make()
    hbm = dev.config.memory.hbm_base
    one = {"target_cubes": (0,), "target_pe": 0}
    cases = [
        (PeDmaMsg("c", "1", 0, 9, 0, hbm, 64), r"src_cube=9: 9 is out of range 0\.\.1"),
        (
            PeDmaMsg("c", "2", 0, 0, 0, 0x7000_0000_0000, 64),
            r"pa range \[0x700000000000.*outside the memory of sip0\.cube0\.pe0",
        ),
        (PeDmaMsg("c", "3", 0, 0, 0, hbm, 0), r"nbytes must be > 0, got 0"),
        (MemoryWriteMsg("c", "4", 0, 0, 0, 0, 64, pattern="purple", **one), r"purple"),
        (
            MemoryWriteMsg("c", "5", 0, 0, 0, 0, 64, src_kind="host_buffer_ref", host_buffer="nope", **one),
            r"host buffer 'nope' is not registered",
        ),
        (MemoryReadMsg("c", "6", 0, 0, 0, 0, 64, host_buffer="nope", **one), r"host buffer 'nope' is not registered"),
        (MmuUnmapMsg("c", "7", (UnmapEntry(VA, 1 << 16),), target_cubes=(0,), target_pe=0), r"sip0\.cube0\.pe0\.mmu"),
        (MmuMapMsg("c", "8", (MapEntry(VA, 0, 1 << 16, 0, 5, 0),), **one), r"owner"),
        (KernelLaunchMsg("c", "9", KernelRef("mystery", "builtin"), (), **one), r"unknown builtin kernel 'mystery'"),
        (MemoryWriteMsg("c", "10", 3, 0, 0, 0, 64, **one), r"dst_sip=3: 3 is out of range 0\.\.0"),
        (MemoryWriteMsg("c", "11", 0, 0, 0, 0, 64, target_cubes=(0, 0), target_pe=0), r"listed twice"),
    ]
    for msg, pattern in cases:
        with pytest.raises(DeviceError, match=pattern) as info:
            await dev.request(msg)
        assert info.value.responses and not info.value.responses[0].success
    # map overlap
    await dev.request(MmuMapMsg("c", "m1", (MapEntry(VA, 0, 1 << 16),), **one))
    with pytest.raises(DeviceError, match="overlaps"):
        await dev.request(MmuMapMsg("c", "m2", (MapEntry(VA, 0, 1 << 16),), **one))
    # still serving
    (ok,) = await dev.request(PeDmaMsg("c", "ok", 0, 1, 3, hbm, 64))
    assert ok.success
    with pytest.raises(TypeError, match="host request message"):
        await dev.request("hello")  # type: ignore[arg-type]
    await dev.aclose()


@pytest.mark.asyncio
async def test_probe_matches_analytic_sum() -> None:
    result = await probe(Sim(), "tiny", sizes=(64, 4096, 1 << 20))
    assert len(result.rows) == 8 * 3 * 2
    for row in result.rows:
        assert row.dma_ps == expected_dma_ps(result.config, row.op, row.nbytes), row
        assert row.round_trip_ps == expected_round_trip_ps(result.config, row.op, row.nbytes), row


@pytest.mark.asyncio
async def test_remote_reads_cost_more_by_the_route() -> None:
    dev = await make("default")
    cfg = dev.config
    page = cfg.memory.page_size
    hbm = cfg.memory.hbm_base
    sim = dev.sim
    n = 1 << 16
    times = {}
    for label, owner in {
        "local": (0, 0, 0),
        "same cube": (0, 0, 1),
        "other cube": (0, 2, 0),
        "other sip": (1, 0, 0),
    }.items():
        va = VA + len(times) * page * 4
        await dev.request(
            MmuMapMsg("c", label, (MapEntry(va, hbm, n, *owner),), target_sips=(0,), target_cubes=(0,), target_pe=0)
        )
        t0 = sim.now
        await dev.read_va((0, 0, 0), va, n)
        times[label] = sim.now - t0
        # Pipelined: each leg costs its bytes over its narrowest hop plus every hop's latency.
        route = dev.route((0, 0, 0), owner)
        m, mem, port = cfg.fabric.msg_bytes, cfg.memory, cfg.links.dma_hbm
        hbm_bw = mem.hbm_channels * mem.hbm_channel_bandwidth
        out_bw = min([port.bandwidth] + [link.bandwidth for link in route])
        back_bw = min([port.bandwidth, hbm_bw] + [link.bandwidth for link in route])
        hops_lat = sum(link.latency for link in route)
        out = -(-m * 10**12 // out_bw) + hops_lat + port.latency
        back = -(-(m + n) * 10**12 // back_bw) + mem.hbm_latency + port.latency + hops_lat
        assert times[label] == cfg.dma.translate + cfg.processing.pe_dma + out + back
    assert times["local"] < times["same cube"] < times["other cube"] < times["other sip"]
    await dev.aclose()


@pytest.mark.asyncio
async def test_concurrent_requests_from_many_host_tasks() -> None:
    dev = await make()
    hbm = dev.config.memory.hbm_base

    async def one(i: int) -> int:
        (r,) = await dev.request(PeDmaMsg("c", f"q{i}", 0, i % 2, i % 4, hbm + 4096 * i, 4096, is_write=True))
        return int(r.value or 0)

    values = await asyncio.gather(*(one(i) for i in range(40)))
    assert len(values) == 40 and all(v > 0 for v in values)
    with pytest.raises(ValueError, match="already in flight"):
        await asyncio.gather(
            dev.request(PeDmaMsg("c", "dup", 0, 0, 0, hbm, 64)), dev.request(PeDmaMsg("c", "dup", 0, 0, 0, hbm, 64))
        )
    await dev.aclose()


@pytest.mark.asyncio
async def test_wire_mode_round_trips_every_message() -> None:
    dev = await make("tiny", wire=True)
    assert dev.blocks["sip0.pcie_ep"].inbox.transform is not None
    buf = np.arange(256, dtype=np.uint8)
    dev.register_host_buffer("b", buf)
    await dev.request(MemoryWriteMsg("c", "w", 0, 1, 1, 0, 256, src_kind="host_buffer_ref", host_buffer="b"))
    await dev.request(MmuMapMsg("c", "m", (MapEntry(VA, 0, 1 << 16, 0, 1, 1),)))
    await dev.request(KernelLaunchMsg("c", "k", KernelRef("nop", "builtin"), ()))
    await dev.aclose()


@pytest.mark.asyncio
async def test_device_lookup_and_stats() -> None:
    dev = await make()
    assert dev.block("sip0.cube1.pe3.dma").kind == "PE_DMA"
    with pytest.raises(KeyError, match="did you mean"):
        dev.block("sip0.cube1.pe3.dmaa")
    kinds = {b.kind for b in dev.blocks.values()}
    assert kinds == {"PCIE_EP", "IO_CPU", "M_CPU", "NOC", "PE_CPU", "PE_DMA", "PE_MMU", "HBM", "SRAM"}
    await dev.request(KernelLaunchMsg("c", "k", KernelRef("nop", "builtin"), ()))
    stats = dev.stats()
    assert stats["sip0.pcie_ep"].msgs_in == 1 + 8  # one request, eight responses
    assert stats["sip0.cube0.pe0.cpu"].busy_ps == dev.config.compute.kernel_launch
    assert 0 < stats["sip0.io_cpu"].utilisation < 1
    levels = dev.level_stats()
    assert levels["host_pcie"]["messages"] == 1 + 8
    await dev.aclose()


def test_probe_reports_progress_per_pe() -> None:
    from kbus.hw.probe import run_probe

    seen: list[tuple[int, int]] = []
    result = run_probe("tiny", sizes=[64], max_pes=3, on_pe=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert len(result.rows) == 3 * 2  # a read and a write per PE
