"""Broadcast mappings on a device: shared by every PE, and the failures they give.

A sharded tensor's map message reaches every PE; each PE's page table must
reference one shared run instead of copying the entries, and every bad
request must still fail naming the PE and the VA while the device carries on.
"""

from __future__ import annotations

from typing import Any

import pytest

from kbus import DeviceError, Sim
from kbus.hw import Device, build_device
from kbus.protocol import KernelLaunchMsg, KernelRef, MapEntry, MmuMapMsg, MmuUnmapMsg, UnmapEntry
from kbus.runtime.builtins import run_concurrently

VA = 0x1000_0000_0000


def _device() -> Device:
    return build_device(Sim(), "tiny")


def _shard_entries(dev: Device, pages_per_shard: int = 2) -> tuple[MapEntry, ...]:
    """One shard per PE, VA-contiguous, each at the bottom of its owner's HBM slice."""
    mem = dev.config.memory
    size = pages_per_shard * mem.page_size
    return tuple(
        MapEntry(VA + k * size, mem.hbm_base, size, s, c, p) for k, (s, c, p) in enumerate(dev.config.pe_coords())
    )


@pytest.mark.asyncio
async def test_broadcast_map_is_one_shared_run_on_every_pe() -> None:
    dev = _device()
    entries = _shard_entries(dev)
    responses = await dev.request(MmuMapMsg("c", "m", entries))
    nodes = list(dev.iter_pes())
    assert len(responses) == len(nodes) == dev.config.num_pes
    runs = [node.mmu.table.shared_runs() for node in nodes]
    assert all(len(r) == 1 and r[0] is runs[0][0] for r in runs)  # one object, referenced P times
    size = entries[0].size
    total = size * len(entries)
    assert all(node.mmu.table.mapped_bytes == total for node in nodes)
    # Any PE translates the last shard's first byte to its owner.
    last = entries[-1]
    for node in nodes:
        (seg,) = node.mmu.translate(last.va + 5, 3)
        assert (seg.sip, seg.cube, seg.pe, seg.pa) == (last.sip, last.cube, last.pe, last.pa + 5)
    await dev.request(MmuUnmapMsg("c", "u", (UnmapEntry(VA, total),)))
    assert all(node.mmu.table.mapped_bytes == 0 for node in nodes)


@pytest.mark.asyncio
async def test_overlap_on_one_target_pe_fails_there_naming_pe_and_va() -> None:
    dev = _device()
    mem = dev.config.memory
    entries = _shard_entries(dev)
    # PE (0, 1, 2) already maps the second page of shard 3 on its own.
    clash_va = entries[3].va + mem.page_size
    await dev.request(
        MmuMapMsg(
            "c",
            "own",
            (MapEntry(clash_va, mem.hbm_base + (1 << 20), mem.page_size, 0, 1, 2),),
            target_sips=(0,),
            target_cubes=(1,),
            target_pe=2,
        )
    )
    with pytest.raises(DeviceError) as info:
        await dev.request(MmuMapMsg("c", "m", entries))
    failed = [r for r in info.value.responses if not r.success]
    assert [(r.src_sip, r.src_cube, r.src_pe) for r in failed] == [(0, 1, 2)]
    err = failed[0].error
    assert err is not None
    assert err.startswith(f"sip0.cube1.pe2.mmu: entries[3] (va={entries[3].va:#x}, size={entries[3].size:#x}): ")
    assert f"overlaps the existing mapping VA [{clash_va:#x}, {clash_va + mem.page_size:#x})" in err
    # The failing PE kept only its own mapping; the others installed the broadcast.
    assert dev.pe(0, 1, 2).mmu.table.mapped_bytes == mem.page_size
    assert dev.pe(0, 0, 0).mmu.table.mapped_bytes == sum(e.size for e in entries)
    # The device keeps serving.
    (ok,) = await dev.request(
        KernelLaunchMsg("c", "nop", KernelRef("nop", "builtin"), (), target_sips=(0,), target_cubes=(0,), target_pe=0)
    )
    assert ok.success


@pytest.mark.asyncio
async def test_unmapping_what_is_not_mapped_names_pe_and_va() -> None:
    dev = _device()
    entries = _shard_entries(dev)
    await dev.request(MmuMapMsg("c", "m", entries))
    total = sum(e.size for e in entries)
    with pytest.raises(DeviceError) as info:
        await dev.request(MmuUnmapMsg("c", "u", (UnmapEntry(VA, total + dev.config.memory.page_size),)))
    errors = [r.error for r in info.value.responses]
    assert len(errors) == dev.config.num_pes
    end = VA + total
    for (s, c, p), err in zip(((r.src_sip, r.src_cube, r.src_pe) for r in info.value.responses), errors, strict=True):
        assert err is not None and err.startswith(f"sip{s}.cube{c}.pe{p}.mmu: entries[0]")
        assert f"VA {end:#x} is not mapped" in err
    # Nothing changed: a failed unmap is a no-op on every PE.
    assert all(node.mmu.table.mapped_bytes == total for node in dev.iter_pes())


@pytest.mark.asyncio
async def test_shared_mapping_freed_while_a_kernel_uses_it() -> None:
    dev = _device()
    entries = _shard_entries(dev)
    await dev.request(MmuMapMsg("c", "m", entries))
    pause = 10_000_000  # 10 us of virtual time: the unmap lands inside it

    async def slow_reader(cpu: Any, msg: KernelLaunchMsg) -> tuple[str | None, int | float | None]:
        me = (cpu.sip, cpu.cube, cpu.pe)
        await dev.read_va(me, entries[-1].va, 64)  # mapped: fine
        await dev.sim.sleep(pause)
        try:
            await dev.read_va(me, entries[-1].va, 64)
        except Exception as exc:
            return f"{cpu.name}: {exc}", None
        return None, None

    dev.builtins["slow_reader"] = slow_reader
    launch = KernelLaunchMsg(
        "c", "k", KernelRef("slow_reader", "builtin"), (), target_sips=(0,), target_cubes=(0,), target_pe=0
    )
    unmap = MmuUnmapMsg("c", "u", (UnmapEntry(VA, sum(e.size for e in entries)),))

    async def try_launch() -> BaseException | None:
        try:
            await dev.request(launch)
        except DeviceError as exc:
            return exc
        return None

    err, _ = await run_concurrently(dev.sim, [try_launch(), dev.request(unmap)])
    assert isinstance(err, DeviceError)
    (resp,) = err.responses
    assert resp.error is not None
    assert f"page fault on sip0.cube0.pe0: VA {entries[-1].va:#x}" in resp.error
    # The device keeps serving: map again and read through it.
    await dev.request(MmuMapMsg("c", "m2", entries))
    assert len(await dev.read_va((0, 0, 0), entries[-1].va, 64)) == 64
