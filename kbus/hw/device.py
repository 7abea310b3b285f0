"""The device: topology builder, routing, DMA data movement and the host port.

``build_device(sim, config)`` lays out the blocks, links and memory channels
of every SIP, cube and PE, starts each block's service loop on ``sim`` and
returns a :class:`Device`. Scripts talk to it by protocol messages through
:meth:`Device.request`, from any coroutine on the loop.

Topology and routes
-------------------
* Per SIP: PCIE_EP and IO_CPU; the host has a link pair to every PCIE_EP, and
  every pair of SIPs has a control link pair between their IO_CPUs (for
  forwarded requests only).
* Per cube: M_CPU, NOC and HBM; the cubes of a SIP are wired by
  ``topology.cube_network`` (ring, mesh2d, torus2d; ``noc_hop`` links) and
  routed the short way round or in dimension order.
* SIP data links (``sip_data``) join the cube-0 NOCs of the SIPs as a full
  mesh or a ring (``topology.sip_network``); data between SIPs never crosses a
  control CPU.
* Per PE: PE_CPU, PE_DMA, PE_MMU and SRAM; one ``noc_pe`` link pair joins a
  PE's blocks to the NOC, and its DMA engine has a port pair to SRAM and to HBM.
* Memory channels: each PE's SRAM, each cube's (or SIP's) HBM.

Every link and memory channel is a :class:`~kbus.hw.network.NetLink` of one
:class:`~kbus.hw.network.Network`: control messages and bulk data share them
as flows (max-min fair, pipelined; see ``kbus/hw/network.py``). Every data
path of a PE goes through its :class:`~kbus.hw.dma.DmaEngine`.
"""

from __future__ import annotations

import difflib
import itertools
import os
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping
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
    MmuMapMsg,
    MmuUnmapMsg,
    PeDmaMsg,
    ResponseMsg,
    roundtrip,
)
from ..protocol.fabric import DmaCommand
from ..sim import Block, Inbox, Sim, SimFuture
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
from .dma import DmaEngine, Leg, Transfer
from .network import NetLink, Network, cube_edges, cube_route, ring_walk, sip_edges

__all__ = ["BlockStats", "Device", "KernelFn", "LinkStats", "PeNode", "build_device"]

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
    up_link: NetLink
    down_link: NetLink
    sram_links: tuple[NetLink, NetLink]
    hbm_links: tuple[NetLink, NetLink]
    sram_channel: NetLink
    """The PE's SRAM as a shared resource (its own DMA and remote PEs' reads share it)."""
    hbm_channel: NetLink
    """The HBM this PE's slice lives in, shared by every PE of the cube (or SIP)."""
    engine: DmaEngine = attrs.field(init=False)
    """The PE's one DMA engine (every data path of the PE goes through it)."""


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


@attrs.frozen
class LinkStats:
    """Traffic of one link or memory channel at the time :meth:`Device.link_stats` was called."""

    name: str
    level: str
    kind: str
    flows: int
    bytes: int
    busy_ps: int
    busy: float
    """Busy fraction of the elapsed time: the integral of the allocated rate over bandwidth (<= 1)."""
    queue_mean_ps: float
    """Mean queueing delay of the flows that crossed it (drain time minus the idle drain time)."""
    queue_p99_ps: int


class _Pending:
    __slots__ = ("expected", "future", "msg", "responses")

    def __init__(self, msg: HostMessage, expected: int, future: SimFuture[tuple[ResponseMsg, ...]]) -> None:
        self.msg = msg
        self.expected = expected
        self.future = future
        self.responses: list[ResponseMsg] = []


class HostDevice:
    """What a host sees of a device: its config, its engine, requests and host buffers.

    :class:`Device` (built in this process) and
    :class:`kbus.remote.RemoteDevice` (served by another) are both host
    devices; the runtime and the kernel language drive either through this
    surface. The targeting helpers read only the config.
    """

    sim: Sim
    config: DeviceConfig
    wire: bool
    transform: Callable[[Any], Any] | None
    builtins: dict[str, KernelFn]
    deployed_resolver: Callable[[PeCpu, KernelLaunchMsg], Awaitable[tuple[str | None, Any]]] | None
    on_request: Callable[[str, HostMessage, tuple[ResponseMsg, ...] | None, int], object] | None
    orphans: list[ResponseMsg]

    @property
    def now_ps(self) -> int:
        return self.sim.now

    async def request(self, msg: HostMessage) -> tuple[ResponseMsg, ...]:
        raise NotImplementedError

    def register_host_buffer(self, name: str, buffer: Any) -> str:
        raise NotImplementedError

    def unregister_host_buffer(self, name: str) -> None:
        raise NotImplementedError

    def host_buffer(self, name: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
        raise NotImplementedError

    def iter_pes(self) -> Iterator[PeNode]:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

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


class Device(HostDevice):
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
        self.net = Network(sim, model=config.fabric.model, packet_bytes=config.fabric.packet_bytes)
        """The data plane every link and memory channel belongs to."""
        self.links: dict[str, NetLink] = {}
        self.channels: dict[str, NetLink] = {}
        """Memory channels by name: each PE's SRAM, each cube's (or SIP's) HBM."""
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
        self._routes: dict[tuple[Coord, Coord], list[NetLink]] = {}
        self._reversed: dict[int, list[NetLink]] = {}
        self._route_ids: set[int] = set()
        self._build()

    # ------------------------------------------------------------------ build
    def _link(self, src: str, dst: str, level: str) -> NetLink:
        spec = getattr(self.config.links, level)
        name = f"{src}->{dst}"
        if name in self.links:
            raise ValueError(f"link {name!r} is wired twice")
        link = NetLink(self.net, name, spec.latency, spec.bandwidth, level)
        self.links[name] = link
        return link

    def _pair(self, a: str, b: str, level: str) -> tuple[NetLink, NetLink]:
        """Links ``a->b`` and ``b->a``, each recorded as the other's reverse."""
        ab, ba = self._link(a, b, level), self._link(b, a, level)
        ab.reverse, ba.reverse = ba, ab
        return ab, ba

    def _channel(self, name: str, latency: int, bandwidth: int, level: str) -> NetLink:
        ch = NetLink(self.net, name, latency, bandwidth, level, kind="memory")
        self.channels[name] = ch
        return ch

    def _add(self, block: Block) -> None:
        self.blocks[block.name] = block

    def _build(self) -> None:
        cfg = self.config
        topo, mem = cfg.topology, cfg.memory
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
        self.host_links: list[NetLink] = []
        self._noc_adj: list[list[dict[int, NetLink]]] = []
        self._sip_adj: list[dict[int, NetLink]] = [{} for _ in range(S)]
        hbm_bw = mem.hbm_channels * mem.hbm_channel_bandwidth
        for s in range(S):
            ep = PcieEp(self, s)
            io = IoCpu(self, s)
            self._add(ep)
            self._add(io)
            down, ep.up_link = self._pair("host", ep.name, "host_pcie")
            self.host_links.append(down)
            ep.up_inbox = self.host_inbox
            ep.io_link, io.up_link = self._pair(ep.name, io.name, "pcie_io")
            ep.io, io.up_inbox = io, ep.resp_inbox
            self.pcie_eps.append(ep)
            self.io_cpus.append(io)
            sip_hbm = self._channel(f"sip{s}.hbm", mem.hbm_latency, hbm_bw, "hbm") if mem.hbm_scope == "sip" else None
            mcpus, nocs, hbms, cubes = [], [], [], []
            for c in range(C):
                m, noc, hbm = MCpu(self, s, c), Noc(self, s, c), HbmBlock(self, s, c)
                for blk in (m, noc, hbm):
                    self._add(blk)
                hbm_ch = sip_hbm or self._channel(hbm.name, mem.hbm_latency, hbm_bw, "hbm")
                io.mcpu_links[c], m.up_link = self._pair(io.name, m.name, "io_mcpu")
                m.up_inbox = io.resp_inbox
                m.noc_link, noc.up_link = self._pair(m.name, noc.name, "mcpu_noc")
                m.noc, noc.up_inbox = noc, m.resp_inbox
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
                    down_l, up_l = self._pair(noc.name, pe_path, "noc_pe")
                    noc.pe_links.append(down_l)
                    node = PeNode(
                        coord=(s, c, p),
                        cpu=cpu,
                        dma=dma,
                        mmu=mmu,
                        sram=sram,
                        up_link=up_l,
                        down_link=down_l,
                        sram_links=self._pair(dma.name, sram.name, "dma_sram"),
                        hbm_links=self._pair(dma.name, f"{hbm.name}.pe{p}", "dma_hbm"),
                        sram_channel=self._channel(sram.name, mem.sram_latency, mem.sram_bandwidth, "sram"),
                        hbm_channel=hbm_ch,
                    )
                    node.engine = DmaEngine(self, (s, c, p), dma, mmu)
                    nodes.append(node)
                mcpus.append(m)
                nocs.append(noc)
                hbms.append(hbm)
                cubes.append(nodes)
            self.mcpus.append(mcpus)
            self.nocs.append(nocs)
            self.hbms.append(hbms)
            self.pes.append(cubes)
            adj: list[dict[int, NetLink]] = [{} for _ in range(C)]
            for a, b in cube_edges(topo.cube_network, C, topo.cube_cols):
                adj[a][b], adj[b][a] = self._pair(nocs[a].name, nocs[b].name, "noc_hop")
            self._noc_adj.append(adj)
        for sa in range(S):
            for sb in range(S):
                if sa != sb:
                    # Control messages between IO_CPUs (SipForward); data has its own links below.
                    self.io_cpus[sa].sip_links[sb] = self._link(self.io_cpus[sa].name, self.io_cpus[sb].name, "sip_sip")
        for a, b in sip_edges(topo.sip_network, S):
            na, nb = self.nocs[a][0].name, self.nocs[b][0].name
            self._sip_adj[a][b], self._sip_adj[b][a] = self._pair(na, nb, "sip_data")
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

    # -------------------------------------------------------------- host port
    def register_host_buffer(self, name: str, buffer: Any) -> str:
        """Make a writable host buffer (numpy array, bytearray, memoryview) addressable by ``name``.

        MemoryWriteMsg with ``src_kind="host_buffer_ref"`` reads from it and
        MemoryReadMsg writes into it. The buffer is used in place, never copied.
        """
        self._host_buffers[name] = host_buffer_bytes(name, buffer, self._host_buffers)
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
            await self.host_links[sip].send(msg, self.pcie_eps[sip].inbox, self.wire_bytes(msg))
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
    def route(self, src: Coord, dst: Coord) -> list[NetLink]:
        """Links a transfer from PE ``src`` to PE ``dst`` crosses (empty when local).

        Within a SIP: up to the NOC, the cube network (dimension-order for
        mesh/torus: columns first, then rows; the short way round on a ring or
        a torus dimension, ties going up), down to the PE. Across SIPs: to the
        source SIP's cube-0 NOC, over the SIP data links (direct on a full
        mesh, the short way round on a ring), then from the target's cube 0.
        """
        key = (src, dst)
        r = self._routes.get(key)
        if r is not None:
            return r
        check = self.config.check_coords
        check(*src)  # a ValueError naming the coordinate, not an IndexError
        check(*dst)
        if src == dst:
            r = []
        else:
            (sa, ca, pa), (sb, cb, pb) = src, dst
            a, b = self.pes[sa][ca][pa], self.pes[sb][cb][pb]
            if sa == sb:
                r = [a.up_link, *self._cube_path(sa, ca, cb), b.down_link]
            else:
                r = [
                    a.up_link,
                    *self._cube_path(sa, ca, 0),
                    *self._sip_path(sa, sb),
                    *self._cube_path(sb, 0, cb),
                    b.down_link,
                ]
        self._routes[key] = r
        self._route_ids.add(id(r))
        return r

    def _cube_path(self, sip: int, a: int, b: int) -> list[NetLink]:
        topo = self.config.topology
        adj = self._noc_adj[sip]
        return [
            adj[x][y]
            for x, y in itertools.pairwise(cube_route(topo.cube_network, topo.cubes_per_sip, topo.cube_cols, a, b))
        ]

    def _sip_path(self, a: int, b: int) -> list[NetLink]:
        topo = self.config.topology
        hops = [a, b] if topo.sip_network == "full" else ring_walk(topo.sips, a, b)
        return [self._sip_adj[x][y] for x, y in itertools.pairwise(hops)]

    def host_path(self, pe: Coord, *, down: bool) -> list[NetLink]:
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

    def memory_of(self, owner: Coord, pa: int, nbytes: int) -> tuple[MemoryBlock, tuple[NetLink, NetLink]]:
        """The memory block holding ``[pa, pa+nbytes)`` on PE ``owner`` and its DMA port links.

        ValueError names the range and the PE's memories.
        """
        mem, ports, _ = self.memory_path(owner, pa, nbytes)
        return mem, ports

    def memory_path(self, owner: Coord, pa: int, nbytes: int) -> tuple[MemoryBlock, tuple[NetLink, NetLink], NetLink]:
        """:meth:`memory_of` plus the shared memory channel (SRAM of the PE, HBM of its cube or SIP)."""
        mem = self.config.memory
        s, c, p = owner
        node = self.pes[s][c][p]
        end = pa + nbytes
        if pa >= 0 and end <= mem.sram_per_pe:
            return node.sram, node.sram_links, node.sram_channel
        if mem.hbm_base <= pa and end <= mem.hbm_base + mem.hbm_per_pe:
            return self.hbms[s][c], node.hbm_links, node.hbm_channel
        raise ValueError(
            f"pa range [{pa:#x}, {end:#x}) is outside the memory of {node.cpu.pe_path} "
            f"(SRAM [0x0, {mem.sram_per_pe:#x}), HBM [{mem.hbm_base:#x}, {mem.hbm_base + mem.hbm_per_pe:#x}))"
        )

    def dma_legs(self, src: Coord, owner: Coord, pa: int, nbytes: int, *, write: bool) -> list[Leg]:
        """The two legs of a DMA by PE ``src`` on ``[pa, pa+nbytes)`` of PE ``owner``'s memory.

        A write carries data + descriptor over the route, the owner's DMA->memory
        port and the memory channel, and a completion descriptor back over the
        port and the reverse route. A read sends the descriptor over the route
        and the port, and brings data + completion back over the channel, the
        port and the reverse route. ``fabric.msg_bytes`` is one descriptor.
        """
        _, (to_mem, from_mem), channel = self.memory_path(owner, pa, nbytes)
        path = self.route(src, owner)
        back = self._reverse(path)
        m = self.config.fabric.msg_bytes
        if write:
            return [([*path, to_mem, channel], m + nbytes), ([from_mem, *back], m)]
        return [([*path, to_mem], m), ([channel, from_mem, *back], m + nbytes)]

    def _reverse(self, path: list[NetLink]) -> list[NetLink]:
        """The way back along ``path``: each link's recorded reverse, last hop first (cached per route)."""
        if not path:
            return path
        back = self._reversed.get(id(path))
        if back is None:
            back = []
            for link in reversed(path):
                assert link.reverse is not None, f"link {link.name!r} has no reverse"
                back.append(link.reverse)
            if id(path) in self._route_ids:  # a cached route lives as long as the device
                self._reversed[id(path)] = back
        return back

    def engine(self, pe: Coord) -> DmaEngine:
        """The DMA engine of PE ``pe``."""
        s, c, p = pe
        return self.pes[s][c][p].engine

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
        extra: int = 0,
        rid: str = "",
        cid: str = "",
    ) -> tuple[str | None, np.ndarray[Any, np.dtype[np.uint8]] | None]:
        """One DMA by PE ``src``'s engine against the memory of PE ``owner``: (error or None, bytes read)."""
        job = self._start_dma(src, owner, op, pa, nbytes, pattern=pattern, data=data, extra=extra, rid=rid, cid=cid)
        if isinstance(job, str):
            return job, None
        err = await job.done
        return err, job.data

    def _start_dma(
        self,
        src: Coord,
        owner: Coord,
        op: str,
        pa: int,
        nbytes: int,
        *,
        pattern: str | None = None,
        data: np.ndarray[Any, Any] | None = None,
        extra: int = 0,
        rid: str = "",
        cid: str = "",
    ) -> Transfer | str:
        """Submit one DMA to PE ``src``'s engine; the transfer, or why it cannot start."""
        where = "sip{}.cube{}.pe{}".format(*owner)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            return f"{where}: nbytes must be > 0, got {nbytes!r}"
        if isinstance(pa, bool) or not isinstance(pa, int):
            return f"{where}: pa must be an int, got {pa!r}"
        try:
            mem, _, _ = self.memory_path(owner, pa, nbytes)
            legs = self.dma_legs(src, owner, pa, nbytes, write=op != "read")
        except ValueError as exc:
            return f"{where}: {exc}"
        cmd = DmaCommand(
            correlation_id=cid,
            request_id=rid,
            sip=owner[0],
            cube=owner[1],
            pe=owner[2],
            op=op,  # type: ignore[arg-type]
            addr=pa,
            nbytes=nbytes,
            pattern=pattern,
        )
        return self.engine(src).submit(legs, action=_act(mem, cmd, data), extra=extra, what=f"{op} {where} {pa:#x}")

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
        """PE ``pe``'s DMA engine pulls ``nbytes`` of a host buffer across PCIe into its memory at ``pa``.

        Legs: a read request up to the host, the data (+ descriptor) down the
        host path into the memory, the completion from the memory to the engine.
        """
        problem = self._check_host_range(pe, host_buffer, host_offset, nbytes)
        if problem:
            return problem
        where = "sip{}.cube{}.pe{}".format(*pe)
        try:
            mem, (to_mem, from_mem), channel = self.memory_path(pe, pa, nbytes)
        except ValueError as exc:
            return f"{where}: {exc}"
        m = self.config.fabric.msg_bytes
        legs: list[Leg] = [
            (self.host_path(pe, down=False), m),
            ([*self.host_path(pe, down=True), to_mem, channel], m + nbytes),
            ([from_mem], m),
        ]
        cmd = DmaCommand(
            correlation_id=cid,
            request_id=rid,
            sip=pe[0],
            cube=pe[1],
            pe=pe[2],
            op="write",
            addr=pa,
            nbytes=nbytes,
            host_buffer=host_buffer,
            host_offset=host_offset,
        )
        job = self.engine(pe).submit(legs, action=_act(mem, cmd, None), after=1, what=f"host write {where} {pa:#x}")
        return await job.done

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
        """PE ``pe``'s DMA engine pushes ``nbytes`` at ``pa`` across PCIe into a host buffer.

        Legs: the descriptor to the memory, then the data (+ completion) from
        the memory channel up the host path.
        """
        if host_buffer is not None or isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            problem = self._check_host_range(pe, host_buffer, host_offset, nbytes)
            if problem:
                return problem
        # else: a seed-form read without host buffer, timed in full; the host discards the bytes.
        where = "sip{}.cube{}.pe{}".format(*pe)
        try:
            mem, (to_mem, from_mem), channel = self.memory_path(pe, pa, nbytes)
        except ValueError as exc:
            return f"{where}: {exc}"
        m = self.config.fabric.msg_bytes
        legs: list[Leg] = [([to_mem], m), ([channel, from_mem, *self.host_path(pe, down=False)], m + nbytes)]
        cmd = DmaCommand(
            correlation_id=cid,
            request_id=rid,
            sip=pe[0],
            cube=pe[1],
            pe=pe[2],
            op="read",
            addr=pa,
            nbytes=nbytes,
            host_buffer=host_buffer,
            host_offset=host_offset,
        )
        job = self.engine(pe).submit(legs, action=_act(mem, cmd, None), what=f"host read {where} {pa:#x}")
        return await job.done

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

    async def read_physical(self, src: Coord, seg: Segment, *, extra: int = 0) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Read one physical segment into the PE ``src`` (raises DeviceError on failure)."""
        err, data = await self._dma(src, (seg.sip, seg.cube, seg.pe), "read", seg.pa, seg.nbytes, extra=extra)
        if err is not None or data is None:
            raise DeviceError(err or "read returned no data")
        return data

    async def write_physical(self, src: Coord, seg: Segment, data: np.ndarray[Any, Any], *, extra: int = 0) -> None:
        """Write bytes from PE ``src`` into one physical segment (raises DeviceError on failure)."""
        err, _ = await self._dma(src, (seg.sip, seg.cube, seg.pe), "write", seg.pa, seg.nbytes, data=data, extra=extra)
        if err is not None:
            raise DeviceError(err)

    async def read_va(self, src: Coord, va: int, nbytes: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Read ``[va, va+nbytes)`` as seen by PE ``src``'s MMU (PageFault if unmapped).

        The engine translates synchronously (charging the lookup on the first
        segment's issue) and issues one transfer per physical segment at once.
        """
        segs, cost = self.engine(src).translate(va, nbytes)
        if len(segs) == 1:
            return await self.read_physical(src, segs[0], extra=cost)
        jobs = [
            self._start_dma(src, (seg.sip, seg.cube, seg.pe), "read", seg.pa, seg.nbytes, extra=cost if i == 0 else 0)
            for i, seg in enumerate(segs)
        ]
        parts = []
        for job in jobs:
            err = job if isinstance(job, str) else await job.done
            if err is not None or isinstance(job, str) or job.data is None:
                raise DeviceError(err or "read returned no data")
            parts.append(job.data)
        return np.concatenate(parts)

    async def write_va(self, src: Coord, va: int, data: np.ndarray[Any, Any]) -> None:
        """Write ``data`` at ``va`` as seen by PE ``src``'s MMU (PageFault if unmapped).

        One transfer per physical segment, all issued at once through the engine.
        """
        raw = as_bytes(data)
        segs, cost = self.engine(src).translate(va, raw.nbytes)
        jobs = []
        off = 0
        for i, seg in enumerate(segs):  # issued at once, like read_va
            part = raw[off : off + seg.nbytes]
            owner = (seg.sip, seg.cube, seg.pe)
            jobs.append(
                self._start_dma(src, owner, "write", seg.pa, seg.nbytes, data=part, extra=cost if i == 0 else 0)
            )
            off += seg.nbytes
        for job in jobs:
            err = job if isinstance(job, str) else await job.done
            if err is not None:
                raise DeviceError(err)

    # --------------------------------------------- helpers used by the blocks
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
        """Traffic per fabric level and memory kind (resources, messages, bytes, busy ps, utilisation)."""
        now = self.sim.now or 1
        levels: dict[str, dict[str, float]] = {}
        for link in (*self.links.values(), *self.channels.values()):
            d = levels.setdefault(link.level, {"links": 0, "messages": 0, "bytes": 0, "busy_ps": 0})
            d["links"] += 1
            d["messages"] += link.messages
            d["bytes"] += link.bytes
            d["busy_ps"] += link.busy_ps
        for d in levels.values():
            d["utilisation"] = d["busy_ps"] / (now * d["links"])
        return levels

    def link_stats(self) -> dict[str, LinkStats]:
        """Per link and memory channel: flows, bytes, busy fraction (<= 1) and queueing delay (mean, p99)."""
        now = self.sim.now or 1
        out = {}
        for link in (*self.links.values(), *self.channels.values()):
            _, mean, p99 = link.queueing()
            busy = link.busy_ps
            out[link.name] = LinkStats(
                link.name, link.level, link.kind, link.messages, link.bytes, busy, busy / now, mean, p99
            )
        return out

    def wire_bytes(self, msg: Any) -> int:
        """Bytes ``msg`` occupies on a link, by the size model of ``fabric``.

        One descriptor (``fabric.msg_bytes``) per message, plus
        ``fabric.map_entry_bytes`` per entry of an MmuMapMsg/MmuUnmapMsg (a
        512-entry map is 512 times the entries of a 1-entry map). Other
        messages carry only references (bulk data moves by DMA), so one
        descriptor is their size.
        """
        fab = self.config.fabric
        t = type(msg)
        if t is MmuMapMsg or t is MmuUnmapMsg:
            return fab.msg_bytes + fab.map_entry_bytes * len(msg.entries)
        return fab.msg_bytes

    async def aclose(self) -> None:
        """Stop every block's service loop (the simulation itself stays usable)."""
        await self.sim.shutdown()

    def __repr__(self) -> str:
        t = self.config.topology
        return (
            f"<Device {self.config.name!r} {t.sips}x{t.cubes_per_sip}x{t.pes_per_cube} now={format_time(self.sim.now)}>"
        )


def host_buffer_bytes(name: object, buffer: Any, registered: Mapping[str, Any]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Check a host buffer about to be registered as ``name``; return its bytes, in place.

    The name must be a new non-empty string; the buffer writable (a read
    writes into it) and contiguous. Every device host surface registers
    buffers through this, so they all refuse the same things alike.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"host buffer name must be a non-empty string, got {name!r}")
    if name in registered:
        raise ValueError(f"host buffer {name!r} is already registered; unregister it first")
    arr = as_bytes(buffer)
    if not arr.flags.writeable:
        raise ValueError(f"host buffer {name!r} is read-only; MemoryReadMsg needs to write into it")
    if isinstance(buffer, np.ndarray) and not buffer.flags.c_contiguous:
        raise ValueError(f"host buffer {name!r} is not C-contiguous")
    return arr


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


def _act(mem: MemoryBlock, cmd: DmaCommand, data: np.ndarray[Any, Any] | None) -> Callable[[Transfer], str | None]:
    """The action of a DMA when it reaches ``mem``: execute ``cmd`` there and keep what a read returns."""
    raw = None if data is None else as_bytes(data)

    def act(job: Transfer) -> str | None:
        mem.msgs_in += 1
        err, out = mem.execute(cmd, raw)
        job.data = out
        return err

    return act
