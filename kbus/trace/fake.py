"""A small stand-in device with the device contract, built from real engine parts.

The tracer, the file sink, the stream, the viewer and their tests and benchmark
must work before (and independently of) the real device in ``kbus.hw``. This
module builds a miniature of it from real :class:`~kbus.Sim`,
:class:`~kbus.Block`, :class:`~kbus.Link` and :class:`~kbus.Inbox` objects, with
the attributes the tracer relies on (``sim``, ``config.name``, ``blocks``,
``links``, ``on_request``) and real protocol messages on its links:

    host -> PCIE_EP -> IO_CPU -> M_CPU -> NOC -> PE_CPU -> PE_DMA -> HBM
                                  ^        |  (resp_inbox)        |
                                  +--------+ <--- Completion -----+

M_CPU fans each request out to the targeted PEs as ``DmaCommand`` s, turns
each ``Completion`` into a ``ResponseMsg`` and sends it back to the host; the
host calls ``device.on_request`` when a request enters and when all its
responses are in. PE_DMA runs transfers concurrently (overlapping busy spans)
and moves the bytes with :meth:`~kbus.Link.carry` (bulk data without a
message); PE_CPU runs kernel-launch work as a ``kernel`` span and reports an
allocation through ``sim.tracer.emit``. It models nothing faithfully: it only
produces every kind of event the real device will.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from ..protocol.fabric import Completion, DmaCommand
from ..protocol.messages import KernelLaunchMsg, KernelRef, MemoryWriteMsg, ResponseMsg
from ..sim import Block, Inbox, Link, Sim, SimFuture

__all__ = ["FakeConfig", "FakeDevice", "run_workload"]

NS = 1000
GBPS = 1_000_000_000


class FakeConfig:
    """Only what traces read of a device configuration: its name."""

    def __init__(self, name: str) -> None:
        self.name = name


class _FakeBlock(Block):
    """A block whose handling is a per-instance function (set by the device)."""

    kind: ClassVar[str] = "block"
    work_ps: ClassVar[int] = 10 * NS

    def __init__(self, sim: Sim, name: str, capacity: int) -> None:
        super().__init__(sim, name, capacity=capacity)
        self.route: Callable[[Any], Any] | None = None

    async def handle(self, msg: Any) -> None:
        await self.busy(self.work_ps, type(msg).__name__)
        assert self.route is not None, f"fake block {self.name} has no route"
        await self.route(msg)


class PcieEp(_FakeBlock):
    kind = "PCIE_EP"
    work_ps = 20 * NS


class IoCpu(_FakeBlock):
    kind = "IO_CPU"
    work_ps = 30 * NS


class MCpu(_FakeBlock):
    kind = "M_CPU"
    work_ps = 50 * NS


class Noc(_FakeBlock):
    """A router with a separate inbox for completions coming back from the PEs."""

    kind = "NOC"
    work_ps = 5 * NS

    def __init__(self, sim: Sim, name: str, capacity: int) -> None:
        super().__init__(sim, name, capacity)
        self.resp_inbox: Inbox[Any] = Inbox(sim, (Completion,), capacity, name=f"{name}.resp")
        self.resp_task: Any = None

    def start(self) -> Any:
        task = super().start()
        if self.resp_task is None or self.resp_task.done():
            self.resp_task = self.sim.spawn(self._run_resp(), name=f"{self.name}.resp", daemon=True)
        return task

    async def _run_resp(self) -> None:
        while True:
            msg = await self.resp_inbox.get()
            self.msgs_in += 1
            await self.handle(msg)


class PeCpu(_FakeBlock):
    kind = "PE_CPU"
    work_ps = 40 * NS


class PeDma(_FakeBlock):
    """Runs every transfer as its own task, so busy spans overlap."""

    kind = "PE_DMA"
    work_ps = 30 * NS

    async def run(self) -> None:
        while True:
            msg = await self.inbox.get()
            self.msgs_in += 1
            self.sim.spawn(self.handle(msg), name=f"{self.name} transfer", daemon=True)


class Hbm(_FakeBlock):
    kind = "HBM"


class FakeDevice:
    """``sips x cubes x pes`` PEs behind one host link per SIP; see the module docstring."""

    def __init__(self, sim: Sim, *, sips: int = 1, cubes: int = 2, pes: int = 2, name: str = "fake") -> None:
        if min(sips, cubes, pes) < 1:
            raise ValueError(f"FakeDevice: sips, cubes and pes must be >= 1, got {sips}, {cubes}, {pes}")
        self.sim = sim
        self.config = FakeConfig(name)
        self.sips, self.cubes, self.pes = sips, cubes, pes
        self.blocks: dict[str, Block] = {}
        self.links: dict[str, Link] = {}
        self.on_request: Any = None
        self.host_inbox: Inbox[ResponseMsg] = Inbox(sim, (ResponseMsg,), 256, name="host")
        self._pending: dict[str, tuple[int, list[ResponseMsg], SimFuture[tuple[ResponseMsg, ...]]]] = {}
        self._host_task: Any = None
        self._host_links: dict[int, tuple[Link, Block]] = {}
        cap = 16
        for s in range(sips):
            sip = f"sip{s}"
            pcie = self._add(PcieEp(sim, f"{sip}.pcie_ep", cap))
            io = self._add(IoCpu(sim, f"{sip}.io_cpu", cap))
            mcpu = self._add(MCpu(sim, f"{sip}.m_cpu", cap))
            to_pcie = self._link("host", pcie.name, 500 * NS, 32 * GBPS)
            pcie_io = self._link(pcie.name, io.name, 50 * NS, 64 * GBPS)
            io_m = self._link(io.name, mcpu.name, 20 * NS, 64 * GBPS)
            m_io = self._link(mcpu.name, io.name, 20 * NS, 64 * GBPS)
            io_pcie = self._link(io.name, pcie.name, 50 * NS, 64 * GBPS)
            pcie_host = self._link(pcie.name, "host", 500 * NS, 32 * GBPS)
            nocs: list[tuple[Noc, Link]] = []
            for c in range(cubes):
                noc = self._add(Noc(sim, f"{sip}.cube{c}.noc", cap))
                m_noc = self._link(mcpu.name, noc.name, 20 * NS, 128 * GBPS)
                noc_m = self._link(noc.name, mcpu.name, 20 * NS, 128 * GBPS)
                nocs.append((noc, m_noc))
                cpus: list[tuple[PeCpu, Link]] = []
                for p in range(pes):
                    pe = f"{sip}.cube{c}.pe{p}"
                    cpu = self._add(PeCpu(sim, f"{pe}.cpu", cap))
                    dma = self._add(PeDma(sim, f"{pe}.dma", cap))
                    hbm = self._add(Hbm(sim, f"{pe}.hbm", cap))
                    cpus.append((cpu, self._link(noc.name, cpu.name, 10 * NS, 128 * GBPS)))
                    cpu.route = self._pe_cpu_route(cpu, dma, self._link(cpu.name, dma.name, 5 * NS, 128 * GBPS))
                    dma.route = self._pe_dma_route(
                        dma,
                        noc,
                        self._link(dma.name, hbm.name, 5 * NS, 256 * GBPS),
                        self._link(dma.name, noc.name, 10 * NS, 128 * GBPS),
                    )
                    hbm.route = _ignore
                noc.route = self._noc_route(noc, cpus, mcpu, noc_m)
            mcpu.route = self._m_cpu_route(mcpu, nocs, io, m_io)
            io.route = self._io_route(io, mcpu, io_m, pcie, io_pcie)
            pcie.route = self._pcie_route(pcie, io, pcie_io, pcie_host)
            self._host_links[s] = (to_pcie, pcie)

    def _add(self, block: Any) -> Any:
        self.blocks[block.name] = block
        return block

    def _link(self, src: str, dst: str, latency: int, bandwidth: int) -> Link:
        name = f"{src}->{dst}"
        link = self.links[name] = Link(self.sim, latency, bandwidth, name=name)
        return link

    # ------------------------------------------------------------- routing
    def _pcie_route(self, b: Block, io: Block, up: Link, down: Link) -> Callable[[Any], Any]:
        async def route(msg: Any) -> None:
            if isinstance(msg, ResponseMsg):
                await b.send(down, msg, self.host_inbox, 64)
            else:
                await b.send(up, msg, io.inbox, 64)

        return route

    def _io_route(self, b: Block, mcpu: Block, up: Link, pcie: Block, down: Link) -> Callable[[Any], Any]:
        async def route(msg: Any) -> None:
            if isinstance(msg, ResponseMsg):
                await b.send(down, msg, pcie.inbox, 64)
            else:
                await b.send(up, msg, mcpu.inbox, 64)

        return route

    def _m_cpu_route(self, b: Block, nocs: list[tuple[Noc, Link]], io: Block, down: Link) -> Callable[[Any], Any]:
        sip = int(b.name.split(".", 1)[0][3:])

        async def route(msg: Any) -> None:
            if isinstance(msg, Completion):
                resp = ResponseMsg(msg.correlation_id, msg.request_id, msg.cube, msg.pe, msg.success, src_sip=sip)
                await b.send(down, resp, io.inbox, 64)
                return
            kernel = isinstance(msg, KernelLaunchMsg)
            for cube, pe in self.targets(msg):
                noc, link = nocs[cube]
                cmd = DmaCommand(
                    msg.correlation_id,
                    msg.request_id,
                    sip,
                    cube,
                    pe,
                    "copy" if kernel else "fill",
                    0x1000,
                    4096 if kernel else getattr(msg, "nbytes", 0),
                    pattern=None if kernel else "zeros",
                    src_addr=0 if kernel else None,
                )
                await b.send(link, cmd, noc.inbox, 64)

        return route

    def _noc_route(self, b: Block, cpus: list[tuple[PeCpu, Link]], mcpu: Block, up: Link) -> Callable[[Any], Any]:
        async def route(msg: Any) -> None:
            if isinstance(msg, Completion):
                await b.send(up, msg, mcpu.inbox, 64)
            else:
                cpu, link = cpus[msg.pe]
                await b.send(link, msg, cpu.inbox, 64)

        return route

    def _pe_cpu_route(self, b: Block, dma: Block, link: Link) -> Callable[[Any], Any]:
        sim = self.sim

        async def route(msg: DmaCommand) -> None:
            tracer = getattr(sim, "tracer", None)
            if msg.op == "copy":
                start = sim.now
                if tracer is not None:
                    tracer.emit("kernel", "fake_kernel", b.name, start, None, {"correlation_id": msg.correlation_id})
                await b.busy(500 * NS, "kernel")
                if tracer is not None:
                    tracer.emit(
                        "kernel", "fake_kernel", b.name, start, sim.now - start, {"correlation_id": msg.correlation_id}
                    )
            elif tracer is not None:
                tracer.emit("mem", "alloc", b.name, sim.now, None, {"pa": msg.addr, "nbytes": msg.nbytes})
            await b.send(link, msg, dma.inbox, 64)

        return route

    def _pe_dma_route(self, b: Block, noc: Noc, data: Link, back: Link) -> Callable[[Any], Any]:
        async def route(msg: DmaCommand) -> None:
            await data.carry(msg.nbytes)
            done = Completion(msg.correlation_id, msg.request_id, msg.sip, msg.cube, msg.pe, True)
            await b.send(back, done, noc.resp_inbox, 64)

        return route

    # ----------------------------------------------------------------- host
    def targets(self, msg: Any) -> list[tuple[int, int]]:
        """(cube, pe) pairs a request acts on, from its ``target_cubes`` x ``target_pe``."""
        tc = getattr(msg, "target_cubes", "all")
        tp = getattr(msg, "target_pe", "all")
        cubes: list[int] = list(range(self.cubes)) if tc == "all" else [int(c) for c in tc]
        pes: list[int] = list(range(self.pes)) if tp == "all" else [int(tp)]
        return [(c, p) for c in cubes for p in pes]

    def start(self) -> None:
        """Start every block's service loop and the host's response collector."""
        for block in self.blocks.values():
            block.start()
        if self._host_task is None:
            self._host_task = self.sim.spawn(self._collect(), name="host.collect", daemon=True)

    async def _collect(self) -> None:
        while True:
            resp = await self.host_inbox.get()
            entry = self._pending.get(resp.correlation_id)
            if entry is None:
                continue
            expected, got, fut = entry
            got.append(resp)
            if len(got) == expected:
                del self._pending[resp.correlation_id]
                fut.set_result(tuple(got))

    async def request(self, msg: Any, sip: int = 0) -> tuple[ResponseMsg, ...]:
        """Send one host request to SIP ``sip`` and wait (in virtual time) for all its responses."""
        expected = len(self.targets(msg))
        fut: SimFuture[tuple[ResponseMsg, ...]] = self.sim.create_future(f"request {msg.correlation_id}")
        self._pending[msg.correlation_id] = (expected, [], fut)
        if self.on_request is not None:
            self.on_request("begin", msg, None, self.sim.now)
        link, pcie = self._host_links[sip]
        await link.send(msg, pcie.inbox, 64)
        responses = await fut
        if self.on_request is not None:
            self.on_request("end", msg, responses, self.sim.now)
        return responses

    async def close(self) -> None:
        await self.sim.shutdown()


async def _ignore(msg: Any) -> None:
    return None


def make_request(device: FakeDevice, i: int) -> Any:
    """Request number ``i`` of the standard mix: unicast writes, broadcasts, kernel launches."""
    corr, rid = f"c{i}", f"r{i}"
    kind = i % 4
    if kind == 3:
        return KernelLaunchMsg(corr, rid, KernelRef("fake_kernel", "builtin"), ())
    if kind == 2:
        return MemoryWriteMsg(corr, rid, 0, 0, 0, 0x1000, 8192, pattern="zeros")  # broadcast
    cube, pe = i % device.cubes, (i // device.cubes) % device.pes
    return MemoryWriteMsg(corr, rid, 0, cube, 0, 0x1000, 2048 * (1 + i % 3), target_cubes=(cube,), target_pe=pe)


async def run_workload(device: FakeDevice, requests: int = 100, window: int = 8, first: int = 0) -> int:
    """Issue ``requests`` requests with up to ``window`` in flight; return the final virtual time.

    Requests are numbered from ``first`` (their correlation ids are ``c<n>``),
    so repeated calls can keep ids unique. The issuers are simulated tasks, so
    the run is deterministic (same events in the same order on every event
    loop). Starts the device if needed.
    """
    device.start()
    sim = device.sim

    async def issuer(w: int) -> None:
        for i in range(first + w, first + requests, window):
            sip = i % device.sips
            await device.request(make_request(device, i), sip)

    for w in range(min(window, requests)):
        sim.spawn(issuer(w), name=f"host.issuer{w}")
    await sim.run()
    return sim.now
