"""Placement and mapping: device memory for tensors, and the MMU messages that map it.

:class:`DeviceMemory` owns the host-side allocators (one per PE, created on
first use, and the device-wide VA range). Allocation happens at the call, so a
tensor's addresses are known at once and out-of-memory is raised where the
user asked. Mapping is queued work: a replicated tensor maps each copy on its
own PE (replicate = local), a sharded tensor broadcasts one map message whose
entries every PE shares (see :mod:`kbus.mem.pagetable`).

Freed ranges go back to the allocators at once but stay on
:attr:`DeviceMemory.released` until their unmap is done; a new tensor reusing
any of them waits for that unmap (:meth:`DeviceMemory.overlaps`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from ..errors import OutOfDeviceMemory
from ..hw import DeviceConfig
from ..mem import PEMemAllocator, VirtualAllocator, format_bytes
from ..protocol import HostMessage, MapEntry, MmuMapMsg, MmuUnmapMsg, PeTarget, ResponseMsg, Targets, UnmapEntry
from ..sim import SimFuture
from .builtins import page_round, run_concurrently
from .policy import Coord, DPPolicy, place
from .tensor import ShardInfo, _Storage

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["DeviceMemory", "MemoryStats", "PeMemory", "Released", "target_groups"]


@attrs.frozen
class PeMemory:
    """Bytes in use and free on one PE (allocations are whole pages)."""

    coord: Coord
    hbm_used: int
    hbm_free: int
    sram_used: int
    sram_free: int

    @property
    def used(self) -> int:
        return self.hbm_used + self.sram_used

    @property
    def free(self) -> int:
        return self.hbm_free + self.sram_free


@attrs.frozen
class MemoryStats:
    """A snapshot of device memory use, from the host allocators (see :meth:`Runtime.memory_stats`)."""

    per_pe: dict[Coord, PeMemory]
    used: int
    """Bytes allocated on all PEs (HBM + SRAM)."""
    free: int
    """Bytes free on all PEs (HBM + SRAM)."""
    va_used: int
    va_free: int
    live_tensors: int
    """Tensors not freed yet."""
    pending_frees: int
    """Frees whose unmap is still queued or in flight."""

    def __str__(self) -> str:
        """A summary that stays a few lines on 4,096 PEs; :meth:`details` lists every PE."""
        lines = [
            f"{self.live_tensors} live tensor(s); {format_bytes(self.used)} used, {format_bytes(self.free)} free "
            f"on {len(self.per_pe)} PE(s); VA {format_bytes(self.va_used)} used; {self.pending_frees} pending free(s)"
        ]
        busy = [m for m in self.per_pe.values() if m.used]
        if busy:
            used = sorted(m.used for m in self.per_pe.values())
            top = max(busy, key=lambda m: m.used)
            lines.append(
                f"  per PE: min {format_bytes(used[0])}, median {format_bytes(used[len(used) // 2])}, "
                f"max {format_bytes(top.used)} ({_pe_name(top.coord)}); {len(busy)} of {len(used)} PE(s) "
                "hold memory (details(): one line per PE)"
            )
        return "\n".join(lines)

    def details(self) -> str:
        """The summary, then one line per PE that holds memory."""
        lines = [str(self).split("\n")[0]]
        lines += [
            f"  {_pe_name(m.coord)}: hbm {format_bytes(m.hbm_used)}, sram {format_bytes(m.sram_used)}"
            for m in self.per_pe.values()
            if m.used
        ]
        return "\n".join(lines)


def _pe_name(coord: Coord) -> str:
    return "sip{}.cube{}.pe{}".format(*coord)


@attrs.define
class Released:
    """Ranges handed back to the allocators whose unmap has not finished yet."""

    va: int
    va_size: int
    pas: dict[Coord, list[tuple[int, int]]]
    done: SimFuture[Any] | None = None


def target_groups(coords: Iterable[Coord], cfg: DeviceConfig) -> list[tuple[Targets, Targets, PeTarget]]:
    """Cover exactly the PEs ``coords`` with few ``(target_sips, target_cubes, target_pe)`` products.

    A message's targets are ``sips x cubes x pe`` where ``pe`` is one index or
    ``"all"``, so an arbitrary PE set may need several messages: one per PE
    index per SIP pattern, merged to ``"all"`` where a whole level is covered.
    """
    t = cfg.topology
    by_sip: dict[int, set[tuple[int, int]]] = {}
    for s, c, p in coords:
        by_sip.setdefault(s, set()).add((c, p))
    full = t.cubes_per_sip * t.pes_per_cube
    patterns: dict[tuple[tuple[Targets, PeTarget], ...], list[int]] = {}
    for s in sorted(by_sip):
        cps = by_sip[s]
        by_pe: dict[int, list[int]] = {}
        for c, p in sorted(cps):
            by_pe.setdefault(p, []).append(c)
        pattern: tuple[tuple[Targets, PeTarget], ...]

        def cubes(cs: list[int]) -> Targets:
            return "all" if len(cs) == t.cubes_per_sip else tuple(cs)

        if len(cps) == full:
            pattern = (("all", "all"),)
        elif len(by_pe) == t.pes_per_cube and len({tuple(v) for v in by_pe.values()}) == 1:
            pattern = ((cubes(by_pe[0]), "all"),)
        else:
            pattern = tuple((cubes(cs), p) for p, cs in sorted(by_pe.items()))
        patterns.setdefault(pattern, []).append(s)
    out: list[tuple[Targets, Targets, PeTarget]] = []
    for pattern, sips in patterns.items():
        sip_t: Targets = "all" if len(sips) == t.sips else tuple(sips)
        for cube_t, pe_t in pattern:
            out.append((sip_t, cube_t, pe_t))
    return out


class DeviceMemory:
    """Allocators, released ranges and map/unmap messages of one runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self.config: DeviceConfig = runtime.config
        self.sim = runtime.sim
        self.device = runtime.device
        self.allocs: dict[Coord, PEMemAllocator] = {}
        mem = self.config.memory
        self.va = VirtualAllocator(mem.va_base, mem.va_size, mem.page_size, name=f"{runtime._cid}.va")
        self.released: list[Released] = []

    def alloc_of(self, coord: Coord) -> PEMemAllocator:
        a = self.allocs.get(coord)
        if a is None:
            mem = self.config.memory
            hbm = mem.hbm_per_pe
            from ..lang import code_region

            code_pe, _pa, code_bytes = code_region(self.config)
            if coord == code_pe:
                hbm -= code_bytes  # the top of this slice holds deployed kernel code
            a = PEMemAllocator("sip{}.cube{}.pe{}".format(*coord), mem.sram_per_pe, hbm, mem.hbm_base)
            self.allocs[coord] = a
        return a

    def _emit_mem(self, name: str, coord: Coord, kind: str, args: dict[str, Any]) -> None:
        tracer = self.sim.tracer
        if tracer is None:
            return
        s, c, p = coord
        path = f"sip{s}.cube{c}.hbm" if kind == "hbm" else f"sip{s}.cube{c}.pe{p}.sram"
        tracer.emit("mem", name, path, self.sim.now, None, {"pe": f"sip{s}.cube{c}.pe{p}", **args})

    def allocate(
        self,
        shape: tuple[int, ...],
        dt: np.dtype[Any],
        policy: DPPolicy,
        name: str,
        memory: str,
        where: str,
        ready: SimFuture[Any],
    ) -> _Storage:
        if memory not in ("hbm", "sram"):
            raise ValueError(f"{where}: memory must be 'hbm' or 'sram', got {memory!r}")
        placement = place(policy, shape, dt.itemsize, self.config)
        page = self.config.memory.page_size
        if placement.replicated:
            va_size = page_round(placement.nbytes, page) if placement.shards else 0
        else:
            va_size = sum(page_round(s.nbytes, page) for s in placement.shards)
        what = f"tensor {name!r} (shape {shape}, {dt}, {policy!r})"
        try:
            va = self.va.alloc(va_size) if va_size else 0
        except OutOfDeviceMemory as exc:
            raise OutOfDeviceMemory(
                f"{where}: no device virtual address range for {what}: {exc}",
                where=exc.where,
                requested=exc.requested,
                free=exc.free,
                largest=exc.largest,
            ) from None
        done: list[tuple[Coord, int]] = []
        try:
            for sp in placement.shards:
                done.append((sp.coord, self.alloc_of(sp.coord).alloc(page_round(sp.nbytes, page), memory)))
        except OutOfDeviceMemory as exc:
            for coord, pa in done:
                self.allocs[coord].free(pa)
            if va_size:
                self.va.free(va)
            per = "on each of" if placement.replicated else "over"
            raise OutOfDeviceMemory(
                f"{where}: cannot allocate {what}, {format_bytes(placement.nbytes)} {per} "
                f"{len(placement.shards)} PE(s): {exc}",
                where=exc.where,
                requested=exc.requested,
                free=exc.free,
                largest=exc.largest,
            ) from None
        shards = []
        next_va = va
        for sp, (coord, pa) in zip(placement.shards, done, strict=True):
            index = [slice(0, n) for n in shape]
            if placement.replicated:
                sva = va
            else:
                sva = next_va
                next_va += page_round(sp.nbytes, page)
                if shape:
                    index[placement.shard_dim] = slice(sp.start, sp.stop)
            shards.append(ShardInfo(*coord, pa, sp.nbytes, sp.offset, sva, tuple(index)))
            self._emit_mem("alloc", coord, memory, {"tensor": name, "pa": pa, "nbytes": page_round(sp.nbytes, page)})
        return _Storage(self._rt, name, placement, dt, va, va_size, tuple(shards), memory, ready)

    def overlaps(self, st: _Storage) -> list[SimFuture[Any]]:
        """Unmaps still pending on ranges ``st`` reuses: its map and writes must wait for them."""
        out: list[SimFuture[Any]] = []
        for r in self.released:
            if r.done is None:
                continue
            hit = bool(st.va_size and r.va_size and st.va < r.va + r.va_size and r.va < st.va + st.va_size)
            if not hit:
                for s in st.shards:
                    size = st.runtime.config.memory.page_size
                    end = s.pa + page_round(s.nbytes, size)
                    if any(pa < end and s.pa < pa + n for pa, n in r.pas.get(s.coord, ())):
                        hit = True
                        break
            if hit:
                out.append(r.done)
        return out

    def release(self, st: _Storage) -> Released:
        """Hand ``st``'s ranges back to the allocators (bookkeeping only)."""
        rel = Released(st.va, st.va_size, {})
        page = self.config.memory.page_size
        for s in st.shards:
            self.allocs[s.coord].free(s.pa)
            rel.pas.setdefault(s.coord, []).append((s.pa, page_round(s.nbytes, page)))
            self._emit_mem("free", s.coord, st.alloc_kind, {"tensor": st.name, "pa": s.pa})
        if st.va_size:
            self.va.free(st.va)
        return rel

    async def map(self, st: _Storage, waits: list[SimFuture[Any]]) -> BaseException | None:
        """Map ``st``'s VA range (after the unmaps of ranges it reuses); never raises."""
        try:
            for fut in waits:
                try:
                    await fut
                except Exception:
                    pass
            if not st.shards:
                return None
            page = self.config.memory.page_size
            if st.placement.replicated:
                # Replicate = local: each PE maps the range to its own copy (the entry names its owner).
                size = page_round(st.nbytes, page)
                msgs: list[HostMessage] = [
                    MmuMapMsg(
                        self._rt._cid,
                        self._rt._rid(),
                        (MapEntry(st.va, s.pa, size, s.sip, s.cube, s.pe),),
                        target_sips=(s.sip,),
                        target_cubes=(s.cube,),
                        target_pe=s.pe,
                    )
                    for s in st.shards
                ]
                results = await run_concurrently(self.sim, [self._try_request(m) for m in msgs])
                errors = []
                for s, r in zip(st.shards, results, strict=True):
                    if isinstance(r, BaseException):
                        errors.append(r)
                    else:
                        st.mapped.append(s.coord)
                if errors:
                    raise errors[0]
            else:
                # Shard = broadcast: every PE can translate the whole range.
                entries = tuple(
                    MapEntry(s.va, s.pa, page_round(s.nbytes, page), s.sip, s.cube, s.pe) for s in st.shards
                )
                await self.device.request(MmuMapMsg(self._rt._cid, self._rt._rid(), entries))
                st.mapped.append("all")
        except Exception as exc:
            return exc
        return None

    async def _try_request(self, msg: HostMessage) -> tuple[ResponseMsg, ...] | BaseException:
        try:
            return await self.device.request(msg)
        except Exception as exc:
            return exc

    def unmap_msgs(self, st: _Storage) -> list[HostMessage]:
        if not st.mapped:
            return []
        entry = (UnmapEntry(st.va, st.va_size),)
        if st.mapped == ["all"]:
            return [MmuUnmapMsg(self._rt._cid, self._rt._rid(), entry)]
        return [
            MmuUnmapMsg(self._rt._cid, self._rt._rid(), entry, target_sips=s, target_cubes=c, target_pe=p)
            for s, c, p in target_groups(st.mapped, self.config)
        ]
