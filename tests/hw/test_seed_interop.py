"""Messages in the seed's exact wire form (no kbus extension fields) do what the seed means."""

from __future__ import annotations

import orjson
import pytest

import kbus
from kbus.hw import build_device
from kbus.protocol import decode, to_wire
from kbus.protocol.fabric import DmaCommand

VA = 0x1000_0000_0000


def seed(**fields: object) -> object:
    """Decode a message given as the seed writes it (JSON wire form)."""
    return decode(orjson.dumps(fields))


@pytest.mark.asyncio
async def test_seed_form_map_entry_is_local_to_the_pe_that_installs_it() -> None:
    dev = build_device(kbus.Sim(), "tiny")
    hbm = dev.config.memory.hbm_base
    # Fill the HBM slice of sip0.cube1.pe3 and of sip0.cube0.pe0 with different bytes.
    assert await dev.dma((0, 1, 3), (0, 1, 3), "fill", hbm, 64, pattern="0x33") is None
    assert await dev.dma((0, 0, 0), (0, 0, 0), "fill", hbm, 64, pattern="0x00") is None
    msg = seed(
        msg_type="mmu_map",
        correlation_id="c",
        request_id="m",
        entries=[{"va": VA, "pa": hbm, "size": 65536}],
        target_sips=[0],
        target_cubes=[1],
        target_pe=3,
    )
    (resp,) = await dev.request(msg)  # type: ignore[arg-type]
    assert resp.success
    (seg,) = dev.pes[0][1][3].mmu.translate(VA, 64)
    assert (seg.sip, seg.cube, seg.pe, seg.pa) == (0, 1, 3, hbm)
    data = await dev.read_va((0, 1, 3), VA, 4)
    assert data.tobytes() == b"\x33" * 4
    await dev.aclose()


@pytest.mark.asyncio
async def test_seed_form_memory_read_without_host_buffer_is_a_timed_read_to_the_host() -> None:
    dev = build_device(kbus.Sim(), "tiny")
    hbm = dev.config.memory.hbm_base
    n = 4096
    msg = seed(
        msg_type="memory_read",
        correlation_id="c",
        request_id="r",
        src_sip=0,
        src_cube=1,
        src_pe=2,
        src_pa=hbm,
        nbytes=n,
        target_cubes=[1],
        target_pe=2,
    )
    before = dev.pcie_eps[0].up_link.bytes
    (resp,) = await dev.request(msg)  # type: ignore[arg-type]
    assert resp.success
    # The data crossed PCIe to the host: n bytes + one descriptor, then the response descriptor.
    m = dev.config.fabric.msg_bytes
    assert dev.pcie_eps[0].up_link.bytes - before == (n + m) + m
    await dev.aclose()


@pytest.mark.asyncio
async def test_seed_form_memory_write_from_host_buffer_says_which_fields_to_add() -> None:
    dev = build_device(kbus.Sim(), "tiny")
    msg = seed(
        msg_type="memory_write",
        correlation_id="c",
        request_id="w",
        dst_sip=0,
        dst_cube=0,
        dst_pe=1,
        dst_pa=dev.config.memory.hbm_base,
        nbytes=64,
        src_kind="host_buffer_ref",
        target_cubes=[0],
        target_pe=1,
    )
    with pytest.raises(kbus.DeviceError, match=r"sip0\.cube0\.pe1\.dma: .*no host_buffer; add host_buffer"):
        await dev.request(msg)  # type: ignore[arg-type]
    # ... and the device keeps serving
    assert await dev.dma((0, 0, 1), (0, 0, 1), "fill", dev.config.memory.hbm_base, 64, pattern="zeros") is None
    await dev.aclose()


def test_dma_command_uses_the_seed_address_names() -> None:
    cmd = DmaCommand("c", "r", 0, 0, 0, "copy", addr=0x2000, nbytes=64, src_addr=0x1000)
    wire = to_wire(cmd)
    assert wire["addr"] == 0x2000 and wire["src_addr"] == 0x1000
    assert "pa" not in wire and "src_pa" not in wire
    assert decode(orjson.dumps(wire)) == cmd


@pytest.mark.asyncio
async def test_map_messages_cost_by_entry_count() -> None:
    """A 512-entry map costs more on the wire and in PE_MMU than a 1-entry map, by the size model."""
    dev = build_device(kbus.Sim(), "tiny")
    cfg = dev.config
    page = cfg.memory.page_size
    times = {}
    for n in (1, 512):
        entries = [{"va": VA + (i + 1000 * n) * page, "pa": 0, "size": page} for i in range(n)]
        msg = seed(
            msg_type="mmu_map",
            correlation_id="c",
            request_id=f"m{n}",
            entries=entries,
            target_sips=[0],
            target_cubes=[0],
            target_pe=0,
        )
        assert dev.wire_bytes(msg) == cfg.fabric.msg_bytes + n * cfg.fabric.map_entry_bytes
        t0 = dev.sim.now
        await dev.request(msg)  # type: ignore[arg-type]
        times[n] = dev.sim.now - t0
    # Extra time = the 511 more entries' bytes over each of the 5 links down to the PE, plus PE_MMU per entry.
    links = cfg.links
    wire = sum(
        -(-(cfg.fabric.msg_bytes + 512 * cfg.fabric.map_entry_bytes) * 10**12 // s.bandwidth)
        - -(-(cfg.fabric.msg_bytes + cfg.fabric.map_entry_bytes) * 10**12 // s.bandwidth)
        for s in (links.host_pcie, links.pcie_io, links.io_mcpu, links.mcpu_noc, links.noc_pe)
    )
    assert times[512] - times[1] == wire + 511 * cfg.processing.pe_mmu_entry
    # and the encoded size grows with the entries too (the model tracks the wire format's shape)
    one = len(orjson.dumps(to_wire(seed(msg_type="mmu_map", correlation_id="c", request_id="a", entries=[entries[0]]))))
    many = len(orjson.dumps(to_wire(seed(msg_type="mmu_map", correlation_id="c", request_id="a", entries=entries))))
    assert many - one > 511 * 20
    await dev.aclose()
