"""The DMA engine of a PE: the one way a PE moves data.

Every path that moves bytes for a PE goes through its :class:`DmaEngine`:
host writes and reads (``MemoryWriteMsg``/``MemoryReadMsg``), ``PeDmaMsg``,
builtin kernels (``Device.read_va`` and friends) and kernel-language loads
and stores. Sharing one engine is what makes them contend with each other the
way they would on hardware.

An engine keeps at most ``dma.outstanding`` transfers in flight; more wait in
FIFO order for a slot. Starting a transfer costs the engine ``processing.pe_dma``
of issue time (one issue at a time, so a burst of commands is issued back to
back), plus the cost of translating its virtual addresses. A transfer is then
a fixed sequence of *legs*, each a flow over a route of the network (see
:mod:`kbus.hw.network`): for a read, the request descriptor goes to the
memory, the memory acts, the data (with the completion) comes back; for a
write, data and descriptor go to the memory, it acts, the completion comes
back.

Address translation is synchronous, as in the seed's design (PE_MMU keeps an
inbox for map/unmap messages and answers ``translate()`` calls directly):
:meth:`DmaEngine.translate` calls :meth:`PeMmu.translate` for every VA access
and charges ``dma.translate`` for it, or, with a TLB (``dma.tlb_entries`` >
0), nothing on a hit and ``dma.tlb_miss`` per page missing from the TLB
(least recently used pages are evicted). Presets leave the TLB off: nothing
in the protocol tells when a map changes under a cached entry, so a TLB is an
experiment a user opts into.

The engine is driven by timer callbacks, not tasks: a transfer costs a few
events per leg whether or not anyone awaits it, so a kernel can issue
hundreds of loads without a task per load.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..mem import Segment

if TYPE_CHECKING:
    from ..sim import Block, SimFuture
    from .blocks import PeMmu
    from .device import Device
    from .network import Flow, NetLink

__all__ = ["DmaEngine", "Leg", "Transfer"]

Leg = tuple["Sequence[NetLink]", int]
"""One step of a transfer: ``(route, nbytes)``."""

Action = Callable[["Transfer"], "str | None"]
"""What the memory does when the transfer reaches it; returns an error or None."""


class Transfer:
    """One DMA transfer in flight: its legs, where it is, and its outcome."""

    __slots__ = ("action", "after", "data", "done", "error", "extra", "k", "legs")

    def __init__(
        self, legs: Sequence[Leg], action: Action | None, after: int, extra: int, done: SimFuture[str | None]
    ) -> None:
        self.legs = legs
        self.action = action
        self.after = after
        self.extra = extra
        self.done = done
        """Resolved with the error (or None) when the last leg has arrived."""
        self.k = 0
        self.error: str | None = None
        self.data: Any = None
        """What a read action left for the caller (the bytes read)."""


class DmaEngine:
    """The DMA engine of the PE at ``coord``; ``block`` is its PE_DMA (busy time is counted there)."""

    def __init__(self, device: Device, coord: tuple[int, int, int], block: Block, mmu: PeMmu) -> None:
        cfg = device.config
        self.device = device
        self.sim = device.sim
        self.net = device.net
        self.coord = coord
        self.block = block
        self.mmu = mmu
        self.name = f"{block.name}.engine"
        self.issue_ps = cfg.processing.pe_dma
        self.limit = cfg.dma.outstanding
        self.translate_ps = cfg.dma.translate
        self.tlb_entries = cfg.dma.tlb_entries
        self.tlb_miss_ps = cfg.dma.tlb_miss
        self.page = cfg.memory.page_size
        self._tlb: OrderedDict[int, None] = OrderedDict()
        self._waiting: deque[Transfer] = deque()
        self.active = 0
        self.issue_free = 0
        self.transfers = 0
        self.queued = 0
        """Transfers that had to wait for an outstanding slot."""
        self.translations = 0
        self.tlb_hits = 0
        self.tlb_misses = 0

    # ------------------------------------------------------------ translation
    def translate(self, va: int, nbytes: int) -> tuple[list[Segment], int]:
        """Segments of ``[va, va+nbytes)`` from the PE's MMU, and the picoseconds the lookup costs.

        Raises :class:`~kbus.mem.PageFault` (naming the PE and address) if unmapped.
        """
        segs = self.mmu.translate(va, nbytes)
        self.translations += 1
        if not self.tlb_entries:
            return segs, self.translate_ps
        tlb = self._tlb
        cost = 0
        page = self.page
        for p in range(va // page, (va + max(nbytes, 1) - 1) // page + 1):
            if p in tlb:
                tlb.move_to_end(p)
                self.tlb_hits += 1
            else:
                self.tlb_misses += 1
                cost += self.tlb_miss_ps
                tlb[p] = None
                if len(tlb) > self.tlb_entries:
                    tlb.popitem(last=False)
        return segs, cost

    def flush_tlb(self) -> None:
        """Forget every cached translation (after a map changes)."""
        self._tlb.clear()

    # --------------------------------------------------------------- transfers
    def submit(
        self,
        legs: Sequence[Leg],
        *,
        action: Action | None = None,
        after: int = 0,
        extra: int = 0,
        what: str = "transfer",
    ) -> Transfer:
        """Queue a transfer; ``await transfer.done`` for its error (or None).

        ``action`` runs when leg ``after`` has arrived (the memory acting on
        the command); ``extra`` picoseconds (address translation) are added
        to the issue time.
        """
        done: SimFuture[str | None] = self.sim.create_future(f"{self.name}: {what}")
        job = Transfer(legs, action, after, extra, done)
        self.transfers += 1
        if self.active < self.limit:
            self._begin(job)
        else:
            self.queued += 1
            self._waiting.append(job)
        return job

    def _begin(self, job: Transfer) -> None:
        self.active += 1
        sim = self.sim
        now = sim.now
        cost = self.issue_ps + job.extra
        t = (self.issue_free if self.issue_free > now else now) + cost
        self.issue_free = t
        self.block.busy_ps += cost
        sim.call_at(t, self._leg, job)

    def _leg(self, job: Transfer) -> None:
        links, nbytes = job.legs[job.k]
        flow = self.net.start(links, nbytes, self._leg_end, None, job)
        if flow.lazy:  # alone on its route: arrives at its deadline plus the latencies unless slowed down
            flow.owner_timer = self.sim.call_at(flow.deadline + flow.latency, self._lazy_arrived, flow)

    def _lazy_arrived(self, flow: Flow) -> None:
        flow.owner_timer = None
        self.net.retire(flow)
        self._arrived(flow.ctx)

    def _leg_end(self, flow: Flow, arrive: int) -> None:
        if arrive > self.sim.now:
            self.sim.call_at(arrive, self._arrived, flow.ctx)
        else:
            self._arrived(flow.ctx)

    def _arrived(self, job: Transfer) -> None:
        if job.k == job.after and job.action is not None:
            try:
                job.error = job.action(job)
            except Exception as exc:  # a bug in an action must not lose the transfer
                job.error = f"{self.name}: internal error in DMA action: {exc!r}"
        job.k += 1
        if job.k < len(job.legs):
            self._leg(job)
            return
        self.active -= 1
        if self._waiting:
            self._begin(self._waiting.popleft())
        job.done.set_result(job.error)
