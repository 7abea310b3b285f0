"""The device: topology builder, routing, DMA data movement and the host port.

``build_device(sim, config)`` lays out the blocks and links of every SIP, cube
and PE, starts each block's service loop on ``sim`` and returns a
:class:`Device`. Scripts talk to it by protocol messages through
:meth:`Device.request`, from any coroutine on the loop.

Topology and routes
-------------------
* Per SIP: PCIE_EP and IO_CPU; the host has a link pair to every PCIE_EP, and
  every pair of SIPs has a link pair between their IO_CPUs (a full mesh).
* Per cube: M_CPU, NOC and HBM; the cubes of a SIP form a bidirectional ring of
  NOC links (``noc_hop``), routed the short way round (ties go up).
* Per PE: PE_CPU, PE_DMA, PE_MMU and SRAM; one ``noc_pe`` link pair joins a
  PE's blocks to the NOC, and PE_DMA has a link pair to SRAM and to HBM.

Bulk data (DMA) is costed store-and-forward along the route: every hop costs
``nbytes / bandwidth + latency`` and queues behind earlier traffic on that
link, so figures are sums a user can redo from ``kbus info``.
"""

from __future__ import annotations

import difflib
import itertools
import os
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import numpy as np

from ..errors import DeviceError
from ..mem import Segment
from ..protocol import (
    HostMessage,
    KernelLaunchMsg,
    MemoryReadMsg,
    MemoryWriteMsg,
    PeDmaMsg,
    ResponseMsg,
    roundtrip,
)
from ..protocol.fabric import Completion, DmaCommand
from ..sim import Block, Inbox, Link, Sim, SimFuture
from ..sim.units import format_time
from .blocks import (
    REQUESTS,
    HbmBlock,
    IoCpu,
    MCpu,
    MemoryBlock,
    Noc,
    PcieEp,
    PeCpu,
    PeDma,
    PeMmu,
    SramBlock,
    as_bytes,
)
from .config import DeviceConfig

__all__ = ["BlockStats", "Device", "KernelFn", "PeNode", "build_device"]

Coord = tuple[int, int, int]
KernelFn = Callable[[PeCpu, KernelLaunchMsg], Awaitable[tuple[str | None, int | float | None]]]
"""A builtin kernel: ``async fn(pe_cpu, launch_msg) -> (error or None, value)``."""


async def _nop(cpu: PeCpu, msg: KernelLaunchMsg) -> tuple[str | None, int | float | None]:
    return None, None


@attrs.define(slots=True)
class PeNode:
    """The blocks and links of one PE."""

    coord: Coord
    cpu: PeCpu
    dma: PeDma
    mmu: PeMmu
    sram: SramBlock
    up_link: Link
    down_link: Link
    sram_links: tuple[Link, Link]
    hbm_links: tuple[Link, Link]


@attrs.frozen
class BlockStats:
    """Counters of one block at the time :meth:`Device.stats` was called."""

    path: str
    kind: str
    msgs_in: int
    msgs_out: int
    bytes_out: int
    busy_ps: int
    utilisation: float
    max_inbox_depth: int


class _Pending:
    __slots__ = ("expected", "future", "msg", "responses")

    def __init__(self, msg: HostMessage, expected: int, future: SimFuture[tuple[ResponseMsg, ...]]) -> None:
        self.msg = msg
        self.expected = expected
        self.future = future
        self.responses: list[ResponseMsg] = []


class Device:
    """A built device: blocks, links, routes, memory and the host port.

    Create it with :func:`build_device`. ``blocks`` maps every dotted path to
    its block, ``links`` every link name (``"src->dst"``) to its link.
    """

    def __init__(self, sim: Sim, config: DeviceConfig, *, wire: bool = False) -> None:
        self.sim = sim
        self.config = config
        self.wire = wire
        self.transform: Callable[[Any], Any] | None = roundtrip if wire else None
        self.blocks: dict[str, Block] = {}
        self.links: dict[str, Link] = {}
        self.builtins: dict[str, KernelFn] = {"nop": _nop}
        """Builtin kernels by name; ``KernelRef(kind="builtin", name=...)`` looks here."""
        self.deployed_resolver: Callable[[PeCpu, KernelLaunchMsg], Awaitable[tuple[str | None, Any]]] | None = None
        """Runs ``KernelRef(kind="deployed")`` launches; installed by the kernel language."""
        self.on_request: Callable[[str, HostMessage, tuple[ResponseMsg, ...] | None, int], object] | None = None
        """Hook ``on_request(phase, msg, responses, now_ps)`` (phase "begin"/"end") for tracing."""
        self.orphans: list[ResponseMsg] = []
        """Responses that matched no pending request (kept, never dropped silently)."""
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._host_buffers: dict[str, np.ndarray[Any, np.dtype[np.uint8]]] = {}
        self._completions: dict[str, SimFuture[Completion]] = {}
        self._staged: dict[str, np.ndarray[Any, np.dtype[np.uint8]]] = {}
        self._routes: dict[tuple[Coord, Coord], list[Link]] = {}
        self._reversed: dict[int, list[Link]] = {}
        self._route_ids: set[int] = set()
        self._tokens = itertools.count()
        self._build()

    # ------------------------------------------------------------------ build
    def _link(self, src: str, dst: str, level: str) -> Link:
        spec = getattr(self.config.links, level)
        name = f"{src}->{dst}"
        link = Link(self.sim, latency=spec.latency, bandwidth=spec.bandwidth, name=name)
        self.links[name] = link
        return link

    def _add(self, block: Block) -> None:
        self.blocks[block.name] = block

    def _build(self) -> None:
        cfg = self.config
        topo = cfg.topology
        S, C, P = topo.sips, topo.cubes_per_sip, topo.pes_per_cube
        self.host_inbox: Inbox[ResponseMsg] = Inbox(
            self.sim, (ResponseMsg,), cfg.fabric.inbox_capacity, name="host", transform=self.transform
        )
        self.pcie_eps: list[PcieEp] = []
        self.io_cpus: list[IoCpu] = []
        self.mcpus: list[list[MCpu]] = []
        self.nocs: list[list[Noc]] = []
        self.hbms: list[list[HbmBlock]] = []
        self.pes: list[list[list[PeNode]]] = []
        self.host_links: list[Link] = []
        self._noc_ring: list[list[dict[int, Link]]] = []
        for s in range(S):
            ep = PcieEp(self, s)
            io = IoCpu(self, s)
            self._add(ep)
            self._add(io)
            self.host_links.append(self._link("host", ep.name, "host_pcie"))
            ep.up_link, ep.up_inbox = self._link(ep.name, "host", "host_pcie"), self.host_inbox
            ep.io_link, ep.io = self._link(ep.name, io.name, "pcie_io"), io
            io.up_link, io.up_inbox = self._link(io.name, ep.name, "pcie_io"), ep.resp_inbox
            self.pcie_eps.append(ep)
            self.io_cpus.append(io)
            mcpus, nocs, hbms, cubes = [], [], [], []
            for c in range(C):
                m, noc, hbm = MCpu(self, s, c), Noc(self, s, c), HbmBlock(self, s, c)
                for blk in (m, noc, hbm):
                    self._add(blk)
                io.mcpu_links[c] = self._link(io.name, m.name, "io_mcpu")
                m.up_link, m.up_inbox = self._link(m.name, io.name, "io_mcpu"), io.resp_inbox
                m.noc_link, m.noc = self._link(m.name, noc.name, "mcpu_noc"), noc
                noc.up_link, noc.up_inbox = self._link(noc.name, m.name, "mcpu_noc"), m.resp_inbox
                nodes = []
                for p in range(P):
                    cpu, dma, mmu, sram = (
                        PeCpu(self, s, c, p),
                        PeDma(self, s, c, p),
                        PeMmu(self, s, c, p),
                        SramBlock(self, s, c, p),
                    )
                    for pe_blk in (cpu, dma, mmu, sram):
                        self._add(pe_blk)
                    pe_path = cpu.pe_path
                    down = self._link(noc.name, pe_path, "noc_pe")
                    noc.pe_links.append(down)
                    node = PeNode(
                        coord=(s, c, p),
                        cpu=cpu,
                        dma=dma,
                        mmu=mmu,
                        sram=sram,
                        up_link=self._link(pe_path, noc.name, "noc_pe"),
                        down_link=down,
                        sram_links=(
                            self._link(dma.name, sram.name, "dma_sram"),
                            self._link(sram.name, dma.name, "dma_sram"),
                        ),
                        hbm_links=(
                            self._link(dma.name, f"{hbm.name}.pe{p}", "dma_hbm"),
                            self._link(f"{hbm.name}.pe{p}", dma.name, "dma_hbm"),
                        ),
                    )
                    nodes.append(node)
                mcpus.append(m)
                nocs.append(noc)
                hbms.append(hbm)
                cubes.append(nodes)
            self.mcpus.append(mcpus)
            self.nocs.append(nocs)
            self.hbms.append(hbms)
            self.pes.append(cubes)
            ring: list[dict[int, Link]] = [{} for _ in range(C)]
            if C > 1:
                for c in range(C):
                    nxt, prev = (c + 1) % C, (c - 1) % C
                    ring[c][nxt] = self._link(nocs[c].name, nocs[nxt].name, "noc_hop")
                    if C > 2:
                        ring[c][prev] = self._link(nocs[c].name, nocs[prev].name, "noc_hop")
            self._noc_ring.append(ring)
        for sa in range(S):
            for sb in range(S):
                if sa != sb:
                    self.io_cpus[sa].sip_links[sb] = self._link(self.io_cpus[sa].name, self.io_cpus[sb].name, "sip_sip")
        self.sim.spawn(self._host_loop(), name="host", daemon=True)
        for block in self.blocks.values():
            block.start()

    # ------------------------------------------------------------ navigation
    def block(self, path: str) -> Block:
        """The block at dotted ``path`` (``"sip0.cube1.pe3.dma"``); KeyError suggests near misses."""
        try:
            return self.blocks[path]
        except KeyError:
            near = difflib.get_close_matches(path, list(self.blocks), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise KeyError(f"no block {path!r} on device {self.config.name!r}{hint}") from None

    def pe(self, sip: int, cube: int, pe: int) -> PeNode:
        """The :class:`PeNode` at coordinates; ValueError names a coordinate out of range."""
        self.config.check_coords(sip, cube, pe)
        return self.pes[sip][cube][pe]

    def iter_pes(self) -> Iterator[PeNode]:
        for cubes in self.pes:
            for nodes in cubes:
                yield from nodes

    @property
    def now_ps(self) -> int:
        return self.sim.now

    # ---------------------------------------------------------------- targets
    def _sel(self, value: Any, n: int, field: str) -> tuple[int, ...]:
        if value == "all":
            return tuple(range(n))
        items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(items, tuple) or not items:
            raise ValueError(f"{field}={value!r}: expected 'all', an index or a non-empty tuple of indices")
        seen: set[int] = set()
        for i in items:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"{field}={value!r}: {i!r} is out of range 0..{n - 1}")
            if i in seen:
                raise ValueError(f"{field}={value!r}: {i} is listed twice")
            seen.add(i)
        return items

    def target_sips(self, msg: Any) -> tuple[int, ...]:
        t = type(msg)
        S = self.config.topology.sips
        if t is MemoryWriteMsg:
            return self._sel(msg.dst_sip, S, "dst_sip")
        if t is MemoryReadMsg or t is PeDmaMsg:
            return self._sel(msg.src_sip, S, "src_sip")
        return self._sel(getattr(msg, "target_sips", "all"), S, "target_sips")

    def target_cubes(self, msg: Any) -> tuple[int, ...]:
        C = self.config.topology.cubes_per_sip
        if type(msg) is PeDmaMsg:
            return self._sel(msg.src_cube, C, "src_cube")
        return self._sel(msg.target_cubes, C, "target_cubes")

    def target_pes(self, msg: Any) -> tuple[int, ...]:
        P = self.config.topology.pes_per_cube
        if type(msg) is PeDmaMsg:
            return self._sel(msg.src_pe, P, "src_pe")
        return self._sel(msg.target_pe, P, "target_pe")

    def targets(self, msg: HostMessage) -> list[Coord]:
        """Every PE ``msg`` acts on (each answers with one ResponseMsg); ValueError names a bad field."""
        topo = self.config.topology
        t = type(msg)
        if t is MemoryWriteMsg:
            self._sel(msg.dst_cube, topo.cubes_per_sip, "dst_cube")  # type: ignore[union-attr]
            self._sel(msg.dst_pe, topo.pes_per_cube, "dst_pe")  # type: ignore[union-attr]
        elif t is MemoryReadMsg:
            self._sel(msg.src_cube, topo.cubes_per_sip, "src_cube")  # type: ignore[union-attr]
            self._sel(msg.src_pe, topo.pes_per_cube, "src_pe")  # type: ignore[union-attr]
        sips, cubes, pes = self.target_sips(msg), self.target_cubes(msg), self.target_pes(msg)
        return [(s, c, p) for s in sips for c in cubes for p in pes]

    # -------------------------------------------------------------- host port
    def register_host_buffer(self, name: str, buffer: Any) -> str:
        """Make a writable host buffer (numpy array, bytearray, memoryview) addressable by ``name``.

        MemoryWriteMsg with ``src_kind="host_buffer_ref"`` reads from it and
        MemoryReadMsg writes into it. The buffer is used in place, never copied.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"host buffer name must be a non-empty string, got {name!r}")
        if name in self._host_buffers:
            raise ValueError(f"host buffer {name!r} is already registered; unregister it first")
        arr = as_bytes(buffer)
        if not arr.flags.writeable:
            raise ValueError(f"host buffer {name!r} is read-only; MemoryReadMsg needs to write into it")
        if isinstance(buffer, np.ndarray) and not buffer.flags.c_contiguous:
            raise ValueError(f"host buffer {name!r} is not C-contiguous")
        self._host_buffers[name] = arr
        return name

    def unregister_host_buffer(self, name: str) -> None:
        if self._host_buffers.pop(name, None) is None:
            raise KeyError(f"host buffer {name!r} is not registered")

    def host_buffer(self, name: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
        try:
            return self._host_buffers[name]
        except KeyError:
            raise KeyError(f"host buffer {name!r} is not registered") from None

    def _entry_sip(self, msg: HostMessage) -> int:
        return self.target_sips(msg)[0]

    async def request(self, msg: HostMessage) -> tuple[ResponseMsg, ...]:
        """Send ``msg`` into the device and wait until every targeted PE has answered.

        Returns the responses in arrival order. If any failed, raises
        :class:`~kbus.errors.DeviceError` carrying all of them. A request that
        can never complete raises :class:`~kbus.errors.DeadlockError`.
        """
        if not isinstance(msg, REQUESTS):
            raise TypeError(
                f"device.request() takes a host request message ({', '.join(t.__name__ for t in REQUESTS)}), "
                f"got {type(msg).__name__}"
            )
        key = (msg.correlation_id, msg.request_id)
        try:
            targets = self.targets(msg)
        except ValueError as exc:
            resp = ResponseMsg(msg.correlation_id, msg.request_id, -1, -1, False, f"host port: {exc}", -1)
            raise DeviceError(f"{msg.msg_type} {msg.request_id!r} rejected: {exc}", (resp,)) from None
        if key in self._pending:
            raise ValueError(
                f"a request with correlation_id={key[0]!r}, request_id={key[1]!r} is already in flight; "
                "ids must be unique among pending requests"
            )
        fut: SimFuture[tuple[ResponseMsg, ...]] = self.sim.create_future(
            f"responses to {msg.msg_type} {msg.request_id!r}"
        )
        self._pending[key] = _Pending(msg, len(targets), fut)
        if self.on_request is not None:
            self.on_request("begin", msg, None, self.sim.now)
        sip = self._entry_sip(msg)
        sent = False
        try:
            await self.host_links[sip].send(msg, self.pcie_eps[sip].inbox, self.config.fabric.msg_bytes)
            sent = True
            responses = await fut
        except BaseException:
            if not sent:
                # Cancelled while still going onto the host link: the message never
                # entered the device, so nothing will answer it.
                self._pending.pop(key, None)
                if self.on_request is not None:
                    self.on_request("end", msg, (), self.sim.now)
            if not fut.done():
                # Abandoned (cancelled) by the caller: keep collecting so late responses are not orphans.
                fut.set_exception(DeviceError(f"{msg.msg_type} {msg.request_id!r} was abandoned by its caller"))
            raise
        failed = [r for r in responses if not r.success]
        if failed:
            first = failed[0]
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise DeviceError(f"{msg.msg_type} {msg.request_id!r} failed: {first.error}{more}", responses)
        return responses

    async def _host_loop(self) -> None:
        get = self.host_inbox.get
        pending = self._pending
        while True:
            resp = await get()
            p = pending.get((resp.correlation_id, resp.request_id))
            if p is None:
                self.orphans.append(resp)
                warnings.warn(
                    f"response {resp.correlation_id!r}/{resp.request_id!r} from "
                    f"sip{resp.src_sip}.cube{resp.src_cube}.pe{resp.src_pe} matches no pending request",
                    RuntimeWarning,
                    stacklevel=1,
                )
                continue
            p.responses.append(resp)
            if len(p.responses) == p.expected:
                del pending[(resp.correlation_id, resp.request_id)]
                result = tuple(p.responses)
                if self.on_request is not None:
                    self.on_request("end", p.msg, result, self.sim.now)
                if not p.future.done():
                    p.future.set_result(result)

    # ------------------------------------------------------------ data moves
    def route(self, src: Coord, dst: Coord) -> list[Link]:
        """Links a transfer from PE ``src`` to PE ``dst`` crosses (empty when local)."""
        key = (src, dst)
        r = self._routes.get(key)
        if r is not None:
            return r
        if src == dst:
            r = []
        else:
            (sa, ca, pa), (sb, cb, pb) = src, dst
            a, b = self.pes[sa][ca][pa], self.pes[sb][cb][pb]
            if sa == sb:
                r = [a.up_link, *self._ring_path(sa, ca, cb), b.down_link]
            else:
                r = [
                    a.up_link,
                    self.nocs[sa][ca].up_link,
                    self.mcpus[sa][ca].up_link,
                    self.io_cpus[sa].sip_links[sb],
                    self.io_cpus[sb].mcpu_links[cb],
                    self.mcpus[sb][cb].noc_link,
                    b.down_link,
                ]
        self._routes[key] = r
        self._route_ids.add(id(r))
        return r

    def _ring_path(self, sip: int, a: int, b: int) -> list[Link]:
        n = self.config.topology.cubes_per_sip
        if a == b:
            return []
        fwd = (b - a) % n
        step = 1 if fwd <= n - fwd else -1
        ring = self._noc_ring[sip]
        out = []
        c = a
        while c != b:
            nxt = (c + step) % n
            out.append(ring[c][nxt])
            c = nxt
        return out

    def host_path(self, pe: Coord, *, down: bool) -> list[Link]:
        """Links between the host and PE ``pe`` (host->PE if ``down``)."""
        s, c, p = pe
        node = self.pes[s][c][p]
        if down:
            return [
                self.host_links[s],
                self.pcie_eps[s].io_link,
                self.io_cpus[s].mcpu_links[c],
                self.mcpus[s][c].noc_link,
                node.down_link,
            ]
        return [
            node.up_link,
            self.nocs[s][c].up_link,
            self.mcpus[s][c].up_link,
            self.io_cpus[s].up_link,
            self.pcie_eps[s].up_link,
        ]

    async def _travel(self, links: list[Link], nbytes: int) -> None:
        """Book ``links`` in order for ``nbytes`` (store-and-forward) and wait for the arrival."""
        if not links:
            return
        sim = self.sim
        t = sim.now
        for link in links:
            t = link.reserve(t, nbytes)
        if t > sim.now:
            await sim.sleep(t - sim.now)

    def memory_of(self, owner: Coord, pa: int, nbytes: int) -> tuple[MemoryBlock, tuple[Link, Link]]:
        """The memory block holding ``[pa, pa+nbytes)`` on PE ``owner``; ValueError names the range."""
        mem = self.config.memory
        s, c, p = owner
        node = self.pes[s][c][p]
        end = pa + nbytes
        if pa >= 0 and end <= mem.sram_per_pe:
            return node.sram, node.sram_links
        if mem.hbm_base <= pa and end <= mem.hbm_base + mem.hbm_per_pe:
            return self.hbms[s][c], node.hbm_links
        raise ValueError(
            f"pa range [{pa:#x}, {end:#x}) is outside the memory of {node.cpu.pe_path} "
            f"(SRAM [0x0, {mem.sram_per_pe:#x}), HBM [{mem.hbm_base:#x}, {mem.hbm_base + mem.hbm_per_pe:#x}))"
        )

    async def _dma(
        self,
        src: Coord,
        owner: Coord,
        op: str,
        pa: int,
        nbytes: int,
        *,
        pattern: str | None = None,
        data: np.ndarray[Any, Any] | None = None,
        host_buffer: str | None = None,
        host_offset: int = 0,
        rid: str = "",
        cid: str = "",
    ) -> tuple[str | None, np.ndarray[Any, np.dtype[np.uint8]] | None]:
        """One DMA command from PE ``src`` against the memory of PE ``owner``.

        Costs: the command (plus write data) travels the route and the
        owner's DMA->memory link; the completion (plus read data) travels back.
        """
        where = "sip{}.cube{}.pe{}".format(*owner)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            return f"{where}: nbytes must be > 0, got {nbytes!r}", None
        if isinstance(pa, bool) or not isinstance(pa, int):
            return f"{where}: pa must be an int, got {pa!r}", None
        try:
            mem, (to_mem, from_mem) = self.memory_of(owner, pa, nbytes)
        except ValueError as exc:
            return f"{where}: {exc}", None
        msg_b = self.config.fabric.msg_bytes
        token = f"dma{next(self._tokens)}"
        if data is not None:
            self._staged[token] = as_bytes(data)
        path = self.route(src, owner)
        down_bytes = msg_b + (nbytes if op in ("write", "fill") else 0)
        await self._travel([*path, to_mem], down_bytes)
        fut: SimFuture[Completion] = self.sim.create_future(f"{mem.name} completion of {token}")
        self._completions[token] = fut
        cmd = DmaCommand(
            cid,
            token,
            owner[0],
            owner[1],
            owner[2],
            op,  # type: ignore[arg-type]
            pa,
            nbytes,
            host_buffer,
            host_offset,
            pattern,
        )
        await mem.inbox.put(cmd)
        comp = await fut
        up_bytes = msg_b + (nbytes if op == "read" else 0)
        await self._travel([from_mem, *self._reverse(path)], up_bytes)
        out = self._staged.pop(token, None)
        return comp.error, out

    def _reverse(self, path: list[Link]) -> list[Link]:
        """The way back along ``path``: each link's opposite direction, last hop first.

        Routes are cached lists, so the way back is cached by the route's identity
        (every DMA needs it; building it splits link names).
        """
        back = self._reversed.get(id(path))
        if back is None:
            links = self.links
            back = [links["->".join(reversed(link.name.split("->")))] for link in reversed(path)]
            if id(path) in self._route_ids:  # a cached route lives as long as the device
                self._reversed[id(path)] = back
        return back

    async def dma(
        self,
        src: Coord,
        owner: Coord,
        op: str,
        pa: int,
        nbytes: int,
        *,
        pattern: str | None = None,
        rid: str = "",
        cid: str = "",
    ) -> str | None:
        """A fill/read/write DMA between PE ``src`` and the memory of PE ``owner``; returns an error or None."""
        err, _ = await self._dma(src, owner, op, pa, nbytes, pattern=pattern, rid=rid, cid=cid)
        return err

    async def host_to_pe(
        self,
        pe: Coord,
        pa: int,
        nbytes: int,
        host_buffer: str | None,
        host_offset: int,
        *,
        rid: str = "",
        cid: str = "",
    ) -> str | None:
        """PE_DMA of ``pe`` reads ``nbytes`` of a host buffer across PCIe into its memory at ``pa``."""
        problem = self._check_host_range(pe, host_buffer, host_offset, nbytes)
        if problem:
            return problem
        await self._travel(self.host_path(pe, down=False), self.config.fabric.msg_bytes)  # the read request
        await self._travel(self.host_path(pe, down=True), nbytes)  # the data
        err, _ = await self._dma(
            pe, pe, "write", pa, nbytes, host_buffer=host_buffer, host_offset=host_offset, rid=rid, cid=cid
        )
        return err

    async def pe_to_host(
        self,
        pe: Coord,
        pa: int,
        nbytes: int,
        host_buffer: str | None,
        host_offset: int,
        *,
        rid: str = "",
        cid: str = "",
    ) -> str | None:
        """PE_DMA of ``pe`` writes ``nbytes`` at ``pa`` across PCIe into a host buffer."""
        problem = self._check_host_range(pe, host_buffer, host_offset, nbytes)
        if problem:
            return problem
        err, _ = await self._dma(
            pe, pe, "read", pa, nbytes, host_buffer=host_buffer, host_offset=host_offset, rid=rid, cid=cid
        )
        if err is None:
            await self._travel(self.host_path(pe, down=False), nbytes)
        return err

    def _check_host_range(self, pe: Coord, name: str | None, offset: int, nbytes: int) -> str | None:
        """Why a host-buffer transfer by PE_DMA of ``pe`` cannot run (naming the DMA), or None."""
        where = "sip{}.cube{}.pe{}.dma".format(*pe)
        if name is None:
            return f"{where}: host_buffer is not set (needed for host buffer transfers)"
        buf = self._host_buffers.get(name)
        if buf is None:
            return f"{where}: host buffer {name!r} is not registered (device.register_host_buffer)"
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            return f"{where}: nbytes must be > 0, got {nbytes!r}"
        if offset < 0 or offset + nbytes > buf.nbytes:
            return f"{where}: host buffer {name!r} range [{offset}, {offset + nbytes}) exceeds its {buf.nbytes} bytes"
        return None

    async def read_physical(self, src: Coord, seg: Segment) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Read one physical segment into the PE ``src`` (raises DeviceError on failure)."""
        err, data = await self._dma(src, (seg.sip, seg.cube, seg.pe), "read", seg.pa, seg.nbytes)
        if err is not None or data is None:
            raise DeviceError(err or "read returned no data")
        return data

    async def write_physical(self, src: Coord, seg: Segment, data: np.ndarray[Any, Any]) -> None:
        """Write bytes from PE ``src`` into one physical segment (raises DeviceError on failure)."""
        err, _ = await self._dma(src, (seg.sip, seg.cube, seg.pe), "write", seg.pa, seg.nbytes, data=data)
        if err is not None:
            raise DeviceError(err)

    async def read_va(self, src: Coord, va: int, nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Read ``[va, va+nbytes)`` as seen by PE ``src``'s MMU (PageFault if unmapped)."""
        s, c, p = src
        segs = self.pes[s][c][p].mmu.translate(va, nbytes)
        if len(segs) == 1:
            return await self.read_physical(src, segs[0])
        return np.concatenate([await self.read_physical(src, seg) for seg in segs])

    async def write_va(self, src: Coord, va: int, data: np.ndarray[Any, Any]) -> None:
        """Write ``data`` at ``va`` as seen by PE ``src``'s MMU (PageFault if unmapped)."""
        raw = as_bytes(data)
        s, c, p = src
        off = 0
        for seg in self.pes[s][c][p].mmu.translate(va, raw.nbytes):
            await self.write_physical(src, seg, raw[off : off + seg.nbytes])
            off += seg.nbytes

    # --------------------------------------------- helpers used by the blocks
    def complete(self, token: str, completion: Completion) -> None:
        fut = self._completions.pop(token, None)
        if fut is None:
            raise KeyError(f"completion for unknown DMA command {token!r}")
        fut.set_result(completion)

    def stage(self, token: str, data: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        self._staged[token] = data

    def take_staged(self, token: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
        try:
            return self._staged.pop(token)
        except KeyError:
            raise KeyError(f"DMA command {token!r} has no staged data") from None

    def check_map_entry(self, e: Any) -> str | None:
        """Why a map entry is invalid (owner out of range, PA outside its memory), or None."""
        try:
            self.config.check_coords(e.sip, e.cube, e.pe)
        except ValueError as exc:
            return f"owner: {exc}"
        if e.size <= 0:
            return f"size must be > 0, got {e.size}"
        try:
            self.memory_of((e.sip, e.cube, e.pe), e.pa, e.size)
        except ValueError as exc:
            return str(exc)
        return None

    async def run_kernel(self, cpu: PeCpu, msg: KernelLaunchMsg) -> tuple[str | None, int | float | None]:
        ref = msg.kernel_ref
        kind: str = ref.kind
        if kind == "builtin":
            fn = self.builtins.get(ref.name)
            if fn is None:
                known = ", ".join(sorted(self.builtins))
                return f"{cpu.name}: unknown builtin kernel {ref.name!r} (known: {known})", None
            return await fn(cpu, msg)
        if kind == "deployed":
            if self.deployed_resolver is None:
                return f"{cpu.name}: no kernel language is attached to run deployed kernel {ref.name!r}", None
            err, value = await self.deployed_resolver(cpu, msg)
            return err, value
        return f"{cpu.name}: unknown kernel kind {ref.kind!r}", None

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, BlockStats]:
        """Per-block counters: messages in/out, bytes, busy time, utilisation, max inbox depth."""
        now = self.sim.now or 1
        out = {}
        for path, b in self.blocks.items():
            depth = b.inbox.max_depth
            resp = getattr(b, "resp_inbox", None)
            if resp is not None:
                depth = max(depth, resp.max_depth)
            out[path] = BlockStats(path, b.kind, b.msgs_in, b.msgs_out, b.bytes_out, b.busy_ps, b.busy_ps / now, depth)
        return out

    def level_stats(self) -> dict[str, dict[str, float]]:
        """Link traffic per fabric level (messages, bytes, busy ps, utilisation)."""
        now = self.sim.now or 1
        levels: dict[str, dict[str, float]] = {}
        for name, link in self.links.items():
            level = _level_of(name)
            d = levels.setdefault(level, {"links": 0, "messages": 0, "bytes": 0, "busy_ps": 0})
            d["links"] += 1
            d["messages"] += link.messages
            d["bytes"] += link.bytes
            d["busy_ps"] += link.busy_ps
        for d in levels.values():
            d["utilisation"] = d["busy_ps"] / (now * d["links"])
        return levels

    async def aclose(self) -> None:
        """Stop every block's service loop (the simulation itself stays usable)."""
        await self.sim.shutdown()

    def __repr__(self) -> str:
        t = self.config.topology
        return (
            f"<Device {self.config.name!r} {t.sips}x{t.cubes_per_sip}x{t.pes_per_cube} now={format_time(self.sim.now)}>"
        )


def _level_of(link_name: str) -> str:
    src, dst = link_name.split("->")
    ends = {src.rsplit(".", 1)[-1], dst.rsplit(".", 1)[-1]}
    if "host" in ends:
        return "host_pcie"
    if "pcie_ep" in ends:
        return "pcie_io"
    if "io_cpu" in ends:
        return "sip_sip" if ends == {"io_cpu"} else "io_mcpu"
    if "m_cpu" in ends:
        return "mcpu_noc"
    if ends == {"noc"}:
        return "noc_hop"
    if "noc" in ends:
        return "noc_pe"
    if "sram" in ends:
        return "dma_sram"
    return "dma_hbm"


def build_device(
    sim: Sim, config: DeviceConfig | str | None = None, *, wire: bool | None = None, freeze: bool = False
) -> Device:
    """Build a device on ``sim`` from a :class:`DeviceConfig`, preset name or TOML path.

    ``wire=True`` (or the environment variable ``KBUS_WIRE=1``) makes every
    inbox round-trip each message through the codec, proving that everything
    crossing a queue is serializable (slower; for tests).

    The build runs with the garbage collector paused: it only creates
    long-lived objects (blocks, inboxes, links), and on ``large`` the
    collector's passes over them were two thirds of the build time.
    ``freeze=True`` also collects once before the build and calls ``gc.freeze()`` on
    everything alive after it, so later full collections skip the device
    entirely (a 4096-PE device is about a million objects); whoever asks for
    it must ``gc.unfreeze()`` once the device is closed (``open_device`` does)
    or the frozen objects are never reclaimed.
    """
    import gc  # local: this function is the only user in the module

    cfg = DeviceConfig.load(config if config is not None else "default")
    if wire is None:
        wire = os.environ.get("KBUS_WIRE", "") not in ("", "0", "false", "no")
    if freeze:
        gc.collect()
    paused = gc.isenabled()
    gc.disable()
    try:
        device = Device(sim, cfg, wire=wire)
    finally:
        if paused:
            gc.enable()
    if freeze:
        gc.freeze()
    return device
