"""The PE's one DMA engine: outstanding limit, issue cost, translation and TLB, shared by every path."""

from __future__ import annotations

import asyncio

import pytest

import kbus
from kbus.hw import DeviceConfig, build_device
from kbus.protocol import MapEntry, MemoryWriteMsg, MmuMapMsg, PeDmaMsg

VA = 0x1000_0000_0000
PS = 10**12


def local_hbm_read_ps(cfg: DeviceConfig, n: int) -> int:
    """By hand: issue + descriptor over the dma_hbm port + data and completion over HBM and the port."""
    m = cfg.fabric.msg_bytes
    port = cfg.links.dma_hbm
    hbm_bw = cfg.memory.hbm_channels * cfg.memory.hbm_channel_bandwidth
    descriptor = -(-m * PS // port.bandwidth) + port.latency
    data = -(-(m + n) * PS // min(port.bandwidth, hbm_bw)) + cfg.memory.hbm_latency + port.latency
    return cfg.processing.pe_dma + descriptor + data


@pytest.mark.asyncio
async def test_outstanding_limit_queues_transfers_in_order() -> None:
    n = 64  # latency-bound: overlapping shows
    for outstanding in (1, 16):
        cfg = DeviceConfig.preset("tiny").with_overrides({"dma.outstanding": outstanding})
        dev = build_device(kbus.Sim(), cfg)
        one = local_hbm_read_ps(cfg, n)
        base = cfg.memory.hbm_base
        t0 = dev.sim.now
        await asyncio.gather(*(dev.dma((0, 0, 0), (0, 0, 0), "read", base + i * n, n) for i in range(3)))
        elapsed = dev.sim.now - t0
        engine = dev.engine((0, 0, 0))
        if outstanding == 1:
            assert elapsed == 3 * one  # strictly one after the other
            assert engine.queued == 2
        else:
            # overlapped: only the issue slot serializes them (the later two start pe_dma apart), and the
            # third's bytes share the port with the others for a few hundred ps at most
            assert 3 * one > elapsed >= one + 2 * cfg.processing.pe_dma
            assert elapsed <= one + 2 * cfg.processing.pe_dma + 1000
            assert engine.queued == 0
        await dev.aclose()


@pytest.mark.asyncio
async def test_every_path_uses_the_one_engine() -> None:
    """Host writes, PeDmaMsg and builtin-style VA reads all count on the same engine and share its issue slot."""
    dev = build_device(kbus.Sim(), "tiny")
    cfg = dev.config
    hbm = cfg.memory.hbm_base
    engine = dev.engine((0, 0, 1))
    dev.register_host_buffer("src", bytearray(256))
    await dev.request(
        MemoryWriteMsg(
            "c", "w", 0, 0, 1, hbm, 256, src_kind="host_buffer_ref", host_buffer="src", target_cubes=(0,), target_pe=1
        )
    )
    await dev.request(PeDmaMsg("c", "d", 0, 0, 1, hbm, 256))
    await dev.request(
        MmuMapMsg("c", "m", (MapEntry(VA, hbm, 1 << 16),), target_sips=(0,), target_cubes=(0,), target_pe=1)
    )
    await dev.read_va((0, 0, 1), VA, 64)
    assert engine.transfers == 3
    assert engine.translations == 1
    assert dev.blocks["sip0.cube0.pe1.dma"].busy_ps == 3 * cfg.processing.pe_dma + cfg.dma.translate
    await dev.aclose()


@pytest.mark.asyncio
async def test_translation_costs_per_access_and_the_tlb_hides_repeats() -> None:
    page = 1 << 16
    for tlb in (0, 2):
        cfg = DeviceConfig.preset("tiny").with_overrides({"dma.tlb_entries": tlb})
        dev = build_device(kbus.Sim(), cfg)
        hbm = cfg.memory.hbm_base
        await dev.request(
            MmuMapMsg("c", "m", (MapEntry(VA, hbm, 4 * page),), target_sips=(0,), target_cubes=(0,), target_pe=0)
        )
        base_ps = local_hbm_read_ps(cfg, 64)

        costs = []
        for page_no in (0, 0, 1, 2, 0):
            t0 = dev.sim.now
            await dev.read_va((0, 0, 0), VA + page_no * page, 64)
            costs.append(dev.sim.now - t0 - base_ps)  # what the translation cost
        if tlb == 0:
            assert costs == [cfg.dma.translate] * 5
        else:
            miss = cfg.dma.tlb_miss
            # page 0 misses, then hits; 1 and 2 miss and push page 0 out of a 2-entry TLB, so it misses again
            assert costs == [miss, 0, miss, miss, miss]
            engine = dev.engine((0, 0, 0))
            assert (engine.tlb_hits, engine.tlb_misses) == (1, 4)
        await dev.aclose()
