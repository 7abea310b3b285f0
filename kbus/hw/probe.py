"""``kbus probe``: PE -> HBM DMA latency and bandwidth on an idle device.

For every PE and size the probe sends a :class:`~kbus.protocol.PeDmaMsg` read
and write (one at a time, so the device is idle) and records two figures:

* the **DMA latency**, measured by the PE_DMA itself (``ResponseMsg.value``):
  from the command's arrival to its completion;
* the **round trip** seen by the host, from send to the last response.

On an idle device each equals the analytic sum of the configured path, which
:func:`expected_dma_ps` and :func:`expected_round_trip_ps` compute from the
configuration alone (a test checks they agree).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from ..protocol import PeDmaMsg
from ..sim import Sim, run
from ..sim.units import format_bandwidth, format_time
from .config import DeviceConfig
from .device import build_device

__all__ = ["ProbeResult", "ProbeRow", "expected_dma_ps", "expected_round_trip_ps", "print_probe", "probe", "run_probe"]

DEFAULT_SIZES = (64, 4096, 65536, 1 << 20)


@attrs.frozen
class ProbeRow:
    """One measurement: PE path, op, size, DMA latency and host round trip (ps)."""

    pe: str
    op: str
    nbytes: int
    dma_ps: int
    round_trip_ps: int

    @property
    def bandwidth(self) -> float:
        """Achieved bytes/s over the DMA latency."""
        return self.nbytes * 1e12 / self.dma_ps if self.dma_ps else 0.0


@attrs.frozen
class ProbeResult:
    config: DeviceConfig
    rows: tuple[ProbeRow, ...]


def expected_dma_ps(cfg: DeviceConfig, op: str, nbytes: int) -> int:
    """Analytic PE_DMA latency of a local HBM ``op`` ("read"/"write") of ``nbytes`` on an idle device.

    = the engine's issue time + two pipelined flows (see :mod:`kbus.hw.network`)
    over the PE's ``dma_hbm`` port and the HBM (bandwidth ``hbm_channels`` x
    ``hbm_channel_bandwidth``, access latency ``hbm_latency``):

    * write: data + descriptor over port and HBM, then the completion back over the port;
    * read: the descriptor over the port, then data + completion over HBM and the port.

    A flow alone on its route takes ``ceil(bytes / narrowest bandwidth)`` plus the latency of every hop.
    """
    port = cfg.links.dma_hbm
    mem = cfg.memory
    hbm_bw = mem.hbm_channels * mem.hbm_channel_bandwidth
    m = cfg.fabric.msg_bytes
    narrow = min(port.bandwidth, hbm_bw)
    data = -(-(m + nbytes) * 10**12 // narrow) + port.latency + mem.hbm_latency
    descriptor = port.serialization(m) + port.latency
    return cfg.processing.pe_dma + data + descriptor


def expected_round_trip_ps(cfg: DeviceConfig, op: str, nbytes: int) -> int:
    """Analytic host round trip of a PeDmaMsg: request down, DMA, response up (idle device)."""
    links, proc, m = cfg.links, cfg.processing, cfg.fabric.msg_bytes
    hops = (links.host_pcie, links.pcie_io, links.io_mcpu, links.mcpu_noc, links.noc_pe)
    one_way = sum(link.serialization(m) + link.latency for link in hops)
    # Requests are handled by PCIE_EP, IO_CPU, M_CPU and NOC on the way down; responses by NOC,
    # M_CPU, IO_CPU and PCIE_EP on the way up.
    handling = proc.pcie_ep + proc.io_cpu + proc.m_cpu + proc.noc
    return 2 * (one_way + handling) + expected_dma_ps(cfg, op, nbytes)


async def probe(
    sim: Sim,
    config: DeviceConfig | str,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    max_pes: int | None = None,
    on_pe: Callable[[int, int], object] | None = None,
) -> ProbeResult:
    """Run the probe on a fresh device built on ``sim``.

    ``on_pe(done, total)``, if given, is called after each PE (progress for long runs).
    """
    device = build_device(sim, config)
    cfg = device.config
    base = cfg.memory.hbm_base
    rows = []
    n = 0
    total = cfg.num_pes if max_pes is None else min(max_pes, cfg.num_pes)
    try:
        for node in device.iter_pes():
            if max_pes is not None and n >= max_pes:
                break
            n += 1
            s, c, p = node.coord
            for size in sizes:
                if size > cfg.memory.hbm_per_pe:
                    raise ValueError(f"probe size {size} exceeds the HBM slice of a PE ({cfg.memory.hbm_per_pe} bytes)")
                for is_write in (False, True):
                    msg = PeDmaMsg(
                        "probe",
                        f"{node.cpu.pe_path}/{size}/{'w' if is_write else 'r'}",
                        s,
                        c,
                        p,
                        base,
                        size,
                        is_write=is_write,
                    )
                    t0 = sim.now
                    (resp,) = await device.request(msg)
                    rows.append(
                        ProbeRow(
                            node.cpu.pe_path, "write" if is_write else "read", size, int(resp.value or 0), sim.now - t0
                        )
                    )
            if on_pe is not None:
                on_pe(n, total)
    finally:
        await device.aclose()
    return ProbeResult(cfg, tuple(rows))


def run_probe(
    config: DeviceConfig | str = "default",
    *,
    sizes: list[int] | None = None,
    max_pes: int | None = None,
    use_uvloop: bool = True,
    on_pe: Callable[[int, int], object] | None = None,
) -> ProbeResult:
    """Run :func:`probe` on a new event loop."""
    chosen = tuple(sizes) if sizes else DEFAULT_SIZES
    for size in chosen:
        if size <= 0:
            raise ValueError(f"probe sizes must be > 0, got {size}")

    async def main() -> ProbeResult:
        return await probe(Sim(), DeviceConfig.load(config), chosen, max_pes, on_pe)

    return run(main, use_uvloop=use_uvloop)


def print_probe(result: ProbeResult, console: Console | None = None) -> None:
    """Print the probe table; identical PEs are folded into one row with a count."""
    console = console or Console(highlight=False)
    table = Table(title=f"PE -> HBM DMA probe on {result.config.name!r} (idle device)")
    for col in ("PEs", "op", "bytes", "DMA latency", "bandwidth", "host round trip", "analytic"):
        table.add_column(col, justify="left" if col in ("PEs", "op") else "right")
    groups: dict[tuple[str, int, int, int], list[str]] = {}
    for r in result.rows:
        groups.setdefault((r.op, r.nbytes, r.dma_ps, r.round_trip_ps), []).append(r.pe)
    for (op, nbytes, dma_ps, rt_ps), pes in groups.items():
        expect = expected_dma_ps(result.config, op, nbytes)
        expect_rt = expected_round_trip_ps(result.config, op, nbytes)
        ok = "equal" if (expect, expect_rt) == (dma_ps, rt_ps) else f"{format_time(expect)}, {format_time(expect_rt)}"
        label = pes[0] if len(pes) == 1 else f"{len(pes)} PEs"
        row: list[Any] = [
            label,
            op,
            f"{nbytes:,}",
            format_time(dma_ps),
            format_bandwidth(nbytes * 1e12 / dma_ps),
            format_time(rt_ps),
            ok,
        ]
        table.add_row(*row)
    console.print(table)
