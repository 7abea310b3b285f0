"""The hardware blocks: what each one does with the messages in its inbox.

Requests flow down ``host -> PCIE_EP -> IO_CPU -> M_CPU -> NOC -> PE block``;
responses flow back up the same levels on a separate *response channel* (a
second inbox per routing block), the way real fabrics keep requests and
responses on different virtual channels so that a burst of responses can never
deadlock against a burst of requests.

Every block spends its configured processing time per message (counted as busy
time), then forwards over a port: a :class:`~kbus.hw.network.NetLink`, where the
message shares the link with every other flow on it. A message occupies
:meth:`Device.wire_bytes` on the wire. Errors found by a PE block
become a failed :class:`~kbus.protocol.ResponseMsg` naming what was wrong and
where; the block then serves the next message.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from ..mem import MapConflict, MemoryStore, PageTable, Segment, SharedMapping, SharedMappingCache
from ..mem.pagetable import MapSpec
from ..protocol import (
    KernelLaunchMsg,
    MemoryReadMsg,
    MemoryWriteMsg,
    MmuMapMsg,
    MmuUnmapMsg,
    PeDmaMsg,
    ResponseMsg,
)
from ..protocol.fabric import DmaCommand, SipForward
from ..sim import Block, Inbox

if TYPE_CHECKING:
    from .device import Device
    from .network import NetLink

__all__ = [
    "HbmBlock",
    "IoCpu",
    "MCpu",
    "Noc",
    "PcieEp",
    "PeCpu",
    "PeDma",
    "PeMmu",
    "SramBlock",
]

REQUESTS = (MemoryWriteMsg, MemoryReadMsg, KernelLaunchMsg, PeDmaMsg, MmuMapMsg, MmuUnmapMsg)


class FabricBlock(Block):
    """A routing block with a request inbox and a response inbox (two service loops)."""

    def __init__(self, device: Device, name: str, proc_ps: int, accepts: tuple[type, ...] = REQUESTS) -> None:
        cfg = device.config
        super().__init__(
            device.sim, name, accepts=accepts, capacity=cfg.fabric.inbox_capacity, transform=device.transform
        )
        self.device = device
        self.proc_ps = proc_ps
        self.resp_inbox: Inbox[ResponseMsg] = Inbox(
            device.sim, (ResponseMsg,), cfg.fabric.inbox_capacity, name=f"{name}.resp", transform=device.transform
        )
        self.resp_task: Any = None

    # Wired by the topology builder once both ends exist.
    up_link: NetLink
    """Link one level up (towards the host) for responses."""
    up_inbox: Inbox[ResponseMsg]
    """The response inbox one level up."""

    async def emit(self, link: NetLink, msg: Any, inbox: Inbox[Any], nbytes: int) -> None:
        """Send ``msg`` through the port ``link`` (counted as this block's output)."""
        self.msgs_out += 1
        self.bytes_out += nbytes
        await link.send(msg, inbox, nbytes)

    def start(self) -> Any:
        task = super().start()
        if self.resp_task is None:
            self.resp_task = self.sim.spawn(self.run_responses(), name=f"{self.name}.resp", daemon=True)
        return task

    async def run_responses(self) -> None:
        """Forward responses one level up towards the host."""
        get = self.resp_inbox.get
        link = self.up_link
        dst = self.up_inbox
        nbytes = self.device.config.fabric.msg_bytes
        while True:
            msg = await get()
            self.msgs_in += 1
            await self.busy(self.proc_ps, "response")
            await self.emit(link, msg, dst, nbytes)


class PcieEp(FabricBlock):
    """PCIe endpoint of a SIP: takes host requests off the bus, hands them to the IO_CPU."""

    kind = "PCIE_EP"

    def __init__(self, device: Device, sip: int) -> None:
        super().__init__(device, f"sip{sip}.pcie_ep", device.config.processing.pcie_ep)
        self.sip = sip

    io_link: NetLink
    io: IoCpu

    async def handle(self, msg: Any) -> None:
        await self.busy(self.proc_ps, msg.msg_type)
        await self.emit(self.io_link, msg, self.io.inbox, self.device.wire_bytes(msg))


class IoCpu(FabricBlock):
    """IO processor of a SIP: fans requests out to other SIPs and to the target cubes' M_CPUs."""

    kind = "IO_CPU"

    def __init__(self, device: Device, sip: int) -> None:
        super().__init__(device, f"sip{sip}.io_cpu", device.config.processing.io_cpu, (*REQUESTS, SipForward))
        self.sip = sip
        self.sip_links: dict[int, NetLink] = {}
        self.mcpu_links: dict[int, NetLink] = {}

    async def handle(self, msg: Any) -> None:
        dev = self.device
        forwarded = type(msg) is SipForward
        inner = msg.msg if forwarded else msg
        nbytes = dev.wire_bytes(inner)
        await self.busy(self.proc_ps, inner.msg_type)
        sips = dev.target_sips(inner)
        if not forwarded:
            for s in sips:
                if s != self.sip:
                    await self.emit(
                        self.sip_links[s], SipForward(inner, origin_sip=self.sip), dev.io_cpus[s].inbox, nbytes
                    )
        if self.sip in sips:
            for c in dev.target_cubes(inner):
                await self.emit(self.mcpu_links[c], inner, dev.mcpus[self.sip][c].inbox, nbytes)


class MCpu(FabricBlock):
    """Management CPU of a cube: passes requests to the cube's NOC."""

    kind = "M_CPU"

    def __init__(self, device: Device, sip: int, cube: int) -> None:
        super().__init__(device, f"sip{sip}.cube{cube}.m_cpu", device.config.processing.m_cpu)
        self.sip = sip
        self.cube = cube

    noc_link: NetLink
    noc: Noc

    async def handle(self, msg: Any) -> None:
        await self.busy(self.proc_ps, msg.msg_type)
        await self.emit(self.noc_link, msg, self.noc.inbox, self.device.wire_bytes(msg))


class Noc(FabricBlock):
    """Network-on-chip router of a cube: delivers requests to the target PEs' blocks."""

    kind = "NOC"

    def __init__(self, device: Device, sip: int, cube: int) -> None:
        super().__init__(device, f"sip{sip}.cube{cube}.noc", device.config.processing.noc)
        self.sip = sip
        self.cube = cube
        self.pe_links: list[NetLink] = []

    async def handle(self, msg: Any) -> None:
        dev = self.device
        nbytes = dev.wire_bytes(msg)
        await self.busy(self.proc_ps, msg.msg_type)
        pes = dev.pes[self.sip][self.cube]
        mt = msg.msg_type
        for p in dev.target_pes(msg):
            pe = pes[p]
            dst: Block
            if mt == "kernel_launch":
                dst = pe.cpu
            elif mt in ("mmu_map", "mmu_unmap"):
                dst = pe.mmu
            else:
                dst = pe.dma
            await self.emit(self.pe_links[p], msg, dst.inbox, nbytes)


class PeBlock(Block):
    """A block inside a PE: answers every request with a ResponseMsg over the PE's uplink."""

    def __init__(self, device: Device, sip: int, cube: int, pe: int, unit: str, accepts: tuple[type, ...]) -> None:
        super().__init__(
            device.sim,
            f"sip{sip}.cube{cube}.pe{pe}.{unit}",
            accepts=accepts,
            capacity=device.config.fabric.inbox_capacity,
            transform=device.transform,
        )
        self.device = device
        self.sip = sip
        self.cube = cube
        self.pe = pe
        self.pe_path = f"sip{sip}.cube{cube}.pe{pe}"

    async def respond(self, msg: Any, error: str | None = None, value: int | float | None = None) -> None:
        dev = self.device
        resp = ResponseMsg(
            correlation_id=msg.correlation_id,
            request_id=msg.request_id,
            src_cube=self.cube,
            src_pe=self.pe,
            success=error is None,
            error=error,
            src_sip=self.sip,
            value=value,
        )
        node = dev.pes[self.sip][self.cube][self.pe]
        nbytes = dev.config.fabric.msg_bytes
        self.msgs_out += 1
        self.bytes_out += nbytes
        await node.up_link.send(resp, dev.nocs[self.sip][self.cube].resp_inbox, nbytes)

    async def handle(self, msg: Any) -> None:
        try:
            error, value = await self.execute(msg)
        except Exception as exc:  # a bug in a handler must not kill the block or lose the request
            error, value = f"{self.name}: internal error handling {msg.msg_type}: {exc!r}", None
        await self.respond(msg, error, value)

    async def execute(self, msg: Any) -> tuple[str | None, int | float | None]:
        """Do the work of ``msg``; return ``(error or None, value)``."""
        raise NotImplementedError


class PeMmu(PeBlock):
    """The PE's MMU: a page table filled by map/unmap messages, and a synchronous ``translate``.

    A map message is decoded and validated once for all the PEs it reaches
    (:class:`~kbus.mem.SharedMappingCache`); each PE's table then references
    the shared runs, so a broadcast of E entries to P PEs costs O(P + E).
    """

    kind = "PE_MMU"

    def __init__(self, device: Device, sip: int, cube: int, pe: int) -> None:
        super().__init__(device, sip, cube, pe, "mmu", (MmuMapMsg, MmuUnmapMsg))
        self.table = PageTable(self.pe_path, device.config.memory.page_size)
        self._maps = SharedMappingCache.of(device)

    def owned(self, e: Any) -> Any:
        """``e`` with its owner filled in: an entry without one (the seed's form) is local to this PE.

        The seed maps with ``replicate=local``: a plain ``{"va", "pa", "size"}``
        entry names memory of the PE that installs it.
        """
        if e.sip is None or e.cube is None or e.pe is None:
            return attrs.evolve(
                e,
                sip=self.sip if e.sip is None else e.sip,
                cube=self.cube if e.cube is None else e.cube,
                pe=self.pe if e.pe is None else e.pe,
            )
        return e

    def translate(self, va: int, nbytes: int) -> list[Segment]:
        """Physical segments of ``[va, va+nbytes)``; raises :class:`~kbus.mem.PageFault` if unmapped."""
        return self.table.translate(va, nbytes)

    async def execute(self, msg: Any) -> tuple[str | None, int | float | None]:
        proc = self.device.config.processing
        await self.busy(proc.pe_mmu + proc.pe_mmu_entry * len(msg.entries), msg.msg_type)
        table = self.table
        tracer = self.sim.tracer
        if type(msg) is MmuMapMsg:
            check = self.device.check_map_entry
            # Only owner-tagged messages are cached, so a hit skips the per-entry owner check: a
            # broadcast of E entries to P PEs looks at its entries once, not P times.
            shared_hit = self._maps.peek(msg)
            if shared_hit is not None:
                shared = shared_hit
            elif all(e.sip is not None and e.cube is not None and e.pe is not None for e in msg.entries):
                # Owner-tagged entries mean the same on every PE: decoded once per message, shared.
                owned: Sequence[MapSpec] = msg.entries  # type: ignore[assignment]  # owners checked just above
                shared = self._maps.get(msg, owned, table.page_size, check)
            else:
                # The seed's form (no owner) is local to each installing PE, so it cannot be shared.
                shared = SharedMapping.build([self.owned(e) for e in msg.entries], table.page_size, check)
            try:
                table.install(shared)  # all or nothing: a failed map leaves the table as it was
            except MapConflict as exc:
                e = msg.entries[exc.index]
                return f"{self.name}: entries[{exc.index}] (va={e.va:#x}, size={e.size:#x}): {exc}", None
            self.device.engine((self.sip, self.cube, self.pe)).flush_tlb()
            if tracer is not None:
                for e in msg.entries:
                    tracer.emit("mmu", "map", self.name, self.sim.now, None, {"va": e.va, "size": e.size, "pa": e.pa})
        else:
            for i, e in enumerate(msg.entries):
                try:
                    table.unmap(e.va, e.size)
                except ValueError as exc:
                    return f"{self.name}: entries[{i}] (va={e.va:#x}, size={e.size:#x}): {exc}", None
            self.device.engine((self.sip, self.cube, self.pe)).flush_tlb()
            if tracer is not None:
                for e in msg.entries:
                    tracer.emit("mmu", "unmap", self.name, self.sim.now, None, {"va": e.va, "size": e.size})
        return None, None


class PeDma(PeBlock):
    """The PE_DMA block: takes memory writes/reads and PeDmaMsg off the fabric for the PE's DMA engine.

    The transfer itself is the PE's :class:`~kbus.hw.dma.DmaEngine` (the one every
    data path of the PE shares), which charges the issue time (counted as this
    block's busy time). Seed-form messages without kbus's host-buffer fields:

    * ``MemoryReadMsg`` without ``host_buffer`` is a *timing-only* read: the
      bytes cross PCIe to the host, which discards them (the seed's timing model);
    * ``MemoryWriteMsg`` with ``src_kind="host_buffer_ref"`` but no
      ``host_buffer`` fails, saying which fields to add, since kbus cannot know
      which bytes the host meant.
    """

    kind = "PE_DMA"

    def __init__(self, device: Device, sip: int, cube: int, pe: int) -> None:
        super().__init__(device, sip, cube, pe, "dma", (MemoryWriteMsg, MemoryReadMsg, PeDmaMsg))

    async def execute(self, msg: Any) -> tuple[str | None, int | float | None]:
        dev = self.device
        start = self.sim.now
        me = (self.sip, self.cube, self.pe)
        t = type(msg)
        if t is PeDmaMsg:
            op = "fill" if msg.is_write else "read"
            err = await dev.dma(
                me,
                me,
                op,
                msg.dst_pa,
                msg.nbytes,
                pattern="inc8" if msg.is_write else None,
                rid=msg.request_id,
                cid=msg.correlation_id,
            )
            return err, self.sim.now - start
        if t is MemoryWriteMsg:
            if msg.src_kind == "pattern":
                err = await dev.dma(
                    me,
                    me,
                    "fill",
                    msg.dst_pa,
                    msg.nbytes,
                    pattern=msg.pattern or "zeros",
                    rid=msg.request_id,
                    cid=msg.correlation_id,
                )
            elif msg.host_buffer is None:
                err = (
                    f"{self.name}: MemoryWriteMsg {msg.request_id!r} has src_kind='host_buffer_ref' but no "
                    "host_buffer; add host_buffer (a name registered with Device.register_host_buffer) and "
                    "host_offset, the kbus fields that say which host bytes to write"
                )
            else:
                err = await dev.host_to_pe(
                    me,
                    msg.dst_pa,
                    msg.nbytes,
                    msg.host_buffer,
                    msg.host_offset,
                    rid=msg.request_id,
                    cid=msg.correlation_id,
                )
            return err, None
        if t is MemoryReadMsg:
            err = await dev.pe_to_host(
                me, msg.src_pa, msg.nbytes, msg.host_buffer, msg.host_offset, rid=msg.request_id, cid=msg.correlation_id
            )
            return err, None
        return f"{self.name}: cannot handle {msg.msg_type}", None


class PeCpu(PeBlock):
    """The PE's control CPU: runs kernels named by KernelLaunchMsg.

    Builtin kernels are looked up in the device's kernel registry
    (:attr:`Device.builtins`); ``builtin:nop`` is always there. An unknown
    kernel fails with a reason naming it.
    """

    kind = "PE_CPU"

    def __init__(self, device: Device, sip: int, cube: int, pe: int) -> None:
        super().__init__(device, sip, cube, pe, "cpu", (KernelLaunchMsg,))

    async def execute(self, msg: Any) -> tuple[str | None, int | float | None]:
        dev = self.device
        await self.busy(dev.config.compute.kernel_launch, "launch")
        return await dev.run_kernel(self, msg)


class MemoryBlock(Block):
    """A memory (SRAM of a PE, or HBM of a cube): executes DmaCommands on its byte stores."""

    def __init__(self, device: Device, name: str) -> None:
        super().__init__(
            device.sim,
            name,
            accepts=(DmaCommand,),
            capacity=device.config.fabric.inbox_capacity,
            transform=device.transform,
        )
        self.device = device
        self.failures: list[str] = []
        """Errors of commands that arrived through the inbox, with nobody to answer (never dropped)."""

    def store_for(self, pe: int) -> MemoryStore:
        raise NotImplementedError

    def execute(
        self, cmd: DmaCommand, data: np.ndarray[Any, np.dtype[np.uint8]] | None = None
    ) -> tuple[str | None, np.ndarray[Any, np.dtype[np.uint8]] | None]:
        """Act on ``cmd`` now: (error naming this memory, or None; the bytes a read without host buffer returns).

        Called by a DMA engine when its transfer reaches this memory; ``data``
        is what a write without host buffer carries.
        """
        dev = self.device
        out = None
        try:
            store = self.store_for(cmd.pe)
            op: str = cmd.op
            if op == "fill":
                store.write_pattern(cmd.addr, cmd.nbytes, cmd.pattern or "zeros")
            elif op == "write":
                if cmd.host_buffer is not None:
                    buf = dev.host_buffer(cmd.host_buffer)
                    store.write(cmd.addr, buf[cmd.host_offset : cmd.host_offset + cmd.nbytes])
                elif data is None:
                    return f"{self.name}: write of {cmd.nbytes} bytes at {cmd.addr:#x} carries no data", None
                else:
                    store.write(cmd.addr, data)
            elif op == "read":
                if cmd.host_buffer is None:
                    out = store.read(cmd.addr, cmd.nbytes)
                else:
                    buf = dev.host_buffer(cmd.host_buffer)
                    store.read_into(cmd.addr, buf[cmd.host_offset : cmd.host_offset + cmd.nbytes])
            elif op == "copy":
                if cmd.src_addr is None:
                    return f"{self.name}: copy to {cmd.addr:#x} has no src_addr", None
                store.copy_from(store, cmd.src_addr, cmd.addr, cmd.nbytes)
            else:
                return f"{self.name}: unknown DMA op {op!r}", None
        except (ValueError, KeyError) as exc:
            return f"{self.name}: {exc}", None
        return None, out

    async def handle(self, cmd: DmaCommand) -> None:
        """A command put straight into the inbox (no engine waits on it): act, and keep any failure."""
        error, _ = self.execute(cmd)
        if error is not None:
            self.failures.append(error)
            warnings.warn(error, RuntimeWarning, stacklevel=1)


class SramBlock(MemoryBlock):
    """A PE's SRAM at physical addresses ``[0, sram_per_pe)``."""

    kind = "SRAM"

    def __init__(self, device: Device, sip: int, cube: int, pe: int) -> None:
        super().__init__(device, f"sip{sip}.cube{cube}.pe{pe}.sram")
        self.store = MemoryStore(self.name, 0, device.config.memory.sram_per_pe)

    def store_for(self, pe: int) -> MemoryStore:
        return self.store


class HbmBlock(MemoryBlock):
    """A cube's HBM: one slice per PE at ``[hbm_base, hbm_base + hbm_per_pe)``, allocated lazily."""

    kind = "HBM"

    def __init__(self, device: Device, sip: int, cube: int) -> None:
        super().__init__(device, f"sip{sip}.cube{cube}.hbm")
        self.slices: dict[int, MemoryStore] = {}

    def store_for(self, pe: int) -> MemoryStore:
        s = self.slices.get(pe)
        if s is None:
            mem = self.device.config.memory
            s = self.slices[pe] = MemoryStore(f"{self.name}.pe{pe}", mem.hbm_base, mem.hbm_per_pe)
        return s


def as_bytes(data: Any) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A flat uint8 view of a contiguous buffer (no copy)."""
    arr = np.asarray(data)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr.reshape(-1).view(np.uint8)
