"""The host runtime: ``open_device`` and the ``torch`` handle.

``async with kbus.open_device("tiny") as torch:`` builds a :class:`~kbus.Sim`
and a device on the running loop and yields a :class:`Runtime`, the torch-like
namespace that creates tensors and runs operations on them.

How work flows
--------------
Every factory and operation is synchronous on the host: it checks its inputs,
allocates device memory from the host-side allocators (so ``t.addr`` and
``t.shards`` are known at once and an out-of-memory error is raised at the
call), and puts a *command* on the runtime's FIFO work queue. One simulated
daemon task takes commands off the queue in order and starts each as a
simulated task; a command first waits for the commands that produce its
inputs, maps its output's VA range, then sends its protocol messages
(MemoryWriteMsg, KernelLaunchMsg, ...) through ``device.request``. Commands
without a dependency between them overlap on the device, and because the
engine breaks ties by insertion order, the same program always takes the same
virtual time.

A command that fails stores its error in its output tensor's future (``await
t`` raises it, naming the operation, the tensors and their shapes); commands
that depend on it fail the same way; everything else, and the device, carry on.

Memory lifetime
---------------
Freeing (``t.free()``, ``del t``, leaving a scope, closing the device) returns
the tensor's physical and virtual ranges to the host allocators *at once* and
queues a command that waits for all queued work touching the tensor, then
unmaps it. A new tensor that reuses any of those ranges waits for that unmap
before it maps or writes anything, so memory is never reused under a reader
and a program that frees in a loop without awaiting does not run out of memory.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Final

import anyio
import numpy as np

from ..errors import ConfigError, DeadlockError, MemoryLeakError
from ..hw import DeviceConfig, HostDevice, build_device
from ..mem import format_bytes
from ..sim import Sim, SimFuture
from . import builtins as _builtins
from .mapping import DeviceMemory, MemoryStats, PeMemory
from .ops import TensorOps
from .policy import Coord, DPPolicy, Shard
from .queue import Command, CommandQueue
from .scope import Scope
from .tensor import _Storage
from .transfer import HostTransfers

if TYPE_CHECKING:
    from types import TracebackType

    from ..hw.device import KernelFn
    from ..mem import PEMemAllocator

__all__ = ["MemoryLeakError", "MemoryStats", "PeMemory", "Runtime", "Scope", "open_device"]


_runtimes_on: weakref.WeakKeyDictionary[HostDevice, int] = weakref.WeakKeyDictionary()
"""How many runtimes each device has had: the correlation id of the next one.

Numbered per device, not per process, so that the same script sends the same
bytes (and, since a message's size counts, takes the same virtual time) however
many devices the process opened before.
"""


FREEZE_MIN_PES = 256
"""``open_device`` freezes a device's objects out of the collector's reach from this many PEs up.

A 4096-PE device is about a million objects and full collections walking it
dominated its runs; below a few hundred PEs the full collection that freezing
starts with costs more than it saves (opening and closing ``tiny`` went from
~3 ms to ~20 ms with numpy loaded).
"""


class Runtime(TensorOps):
    """The torch-like handle yielded by :func:`open_device` (by convention named ``torch``).

    Factories: :meth:`tensor`, :meth:`empty`, :meth:`zeros`, :meth:`ones`,
    :meth:`full`, :meth:`arange`, :meth:`rand`. Lifetime: :meth:`scope`,
    :meth:`synchronize`, :meth:`memory_stats`. Custom work: :meth:`launch`.
    Placement defaults to :attr:`default_policy` (``Shard(dim=0)`` over every PE).
    """

    float16: Final = np.dtype(np.float16)
    float32: Final = np.dtype(np.float32)
    float64: Final = np.dtype(np.float64)
    int8: Final = np.dtype(np.int8)
    int16: Final = np.dtype(np.int16)
    int32: Final = np.dtype(np.int32)
    int64: Final = np.dtype(np.int64)
    uint8: Final = np.dtype(np.uint8)
    uint16: Final = np.dtype(np.uint16)
    uint32: Final = np.dtype(np.uint32)
    uint64: Final = np.dtype(np.uint64)

    def __init__(self, device: HostDevice) -> None:
        self.device = device
        self.sim: Sim = device.sim
        self.config: DeviceConfig = device.config
        self.default_policy: DPPolicy = Shard(dim=0)
        """Placement of tensors created without ``policy=``."""
        self.trace: Any = None
        """What ``kbus.trace.attach_from_open_device`` yielded (a trace session), or None."""
        n = _runtimes_on.get(device, 0) + 1
        _runtimes_on[device] = n
        self._cid = f"rt{n}"
        self._rids = itertools.count(1)
        self._tids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._closed = False
        self._live: dict[int, _Storage] = {}
        self._rng = np.random.default_rng(0)
        # The collaborators, one job each: memory and mappings, the work queue, host transfers.
        self._memory = DeviceMemory(self)
        self._transfers = HostTransfers(self)
        _builtins.install(device)
        self._queue = CommandQueue(self.sim, f"{self._cid}.queue", self._memory.map)

    # -- clock and identity --------------------------------------------------------

    @property
    def now_ps(self) -> int:
        """Virtual time in integer picoseconds."""
        return self.sim.now

    @property
    def now_ns(self) -> float:
        """Virtual time in nanoseconds."""
        return self.sim.now / 1000

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._live)} live tensor(s)"
        return f"<kbus.Runtime {self._cid} on {self.device!r}, {state}>"

    def manual_seed(self, seed: int) -> None:
        """Seed the generator behind :meth:`rand` (it starts at seed 0, so runs are reproducible)."""
        self._rng = np.random.default_rng(seed)

    def register_builtin(self, name: str, fn: KernelFn) -> None:
        """Make ``fn`` (``async fn(pe_cpu, launch_msg) -> (error or None, value)``) launchable by ``name``."""
        self.device.builtins[name] = fn

    # -- lifetime ---------------------------------------------------------------------------

    def scope(self) -> Scope:
        """A :class:`Scope` that frees the tensors created inside it on exit."""
        return Scope(self)

    def _alloc_of(self, coord: Coord) -> PEMemAllocator:
        """The host-side allocator of PE ``coord`` (for tests that take memory behind the runtime's back)."""
        return self._memory.alloc_of(coord)

    async def synchronize(self) -> None:
        """Wait until every queued command (including frees) has finished.

        Failures of commands are not raised here; they stay with the tensors
        they concern. A :class:`~kbus.DeadlockError` (work that can never
        finish) is raised.
        """
        while self._queue.inflight:
            for fut in list(self._queue.inflight):
                try:
                    await fut
                except Exception:
                    if not fut.done():  # not the command's own failure: the wait itself failed
                        raise

    def memory_stats(self) -> MemoryStats:
        """Per-PE bytes used and free, totals, VA use and the number of live tensors."""
        mem = self.config.memory
        per_pe: dict[Coord, PeMemory] = {}
        for coord in self.config.pe_coords():
            a = self._memory.allocs.get(coord)
            if a is None:
                per_pe[coord] = PeMemory(coord, 0, mem.hbm_per_pe, 0, mem.sram_per_pe)
            else:
                per_pe[coord] = PeMemory(
                    coord, a.hbm.used_bytes, a.hbm.free_bytes, a.sram.used_bytes, a.sram.free_bytes
                )
        return MemoryStats(
            per_pe=per_pe,
            used=sum(m.used for m in per_pe.values()),
            free=sum(m.free for m in per_pe.values()),
            va_used=self._memory.va.used_bytes,
            va_free=self._memory.va.free_bytes,
            live_tensors=len(self._live),
            pending_frees=len(self._memory.released),
        )

    def live_tensors(self) -> list[str]:
        """Descriptions of the tensors not freed yet (for leak hunting)."""
        return [st.describe() for st in self._live.values()]

    # -- internals: lifetime ----------------------------------------------------------------------

    def free_storage(self, st: _Storage, by: str) -> None:
        """Free ``st`` once: release its ranges now, queue the unmap behind all work on it."""
        if st.freed is not None or (self._closed and by != "device close"):
            return
        st.freed = by
        self._live.pop(id(st), None)
        rel = self._memory.release(st)
        label = f"free {st.name}"
        done: SimFuture[Any] = self.sim.create_future(label)

        async def unmap() -> None:
            try:
                msgs = self._memory.unmap_msgs(st)
                st.mapped.clear()
                if msgs:
                    await self._send(msgs)
            finally:
                self._memory.released.remove(rel)

        rel.done = done
        st.free_done = done
        self._memory.released.append(rel)
        self._queue.enqueue(Command(label, done, unmap, soft=[st.ready, *st.readers]))

    def schedule_collect(self, st: _Storage) -> None:
        """From the finalizer of a dropped Tensor: free it from a clean loop callback."""
        if self._closed:
            return
        loop = self._loop
        try:
            if loop.is_closed():
                return
            if threading.get_ident() == self._thread:
                loop.call_soon(self.free_storage, st, "del (garbage collection)")
            else:
                loop.call_soon_threadsafe(self.free_storage, st, "del (garbage collection)")
        except RuntimeError:  # the loop closed between the check and the call
            pass

    # -- internals: closing -----------------------------------------------------------------------

    def _leaks(self) -> list[str]:
        out = []
        for _, a in sorted(self._memory.allocs.items()):
            for region in (a.hbm, a.sram):
                if region.used_bytes:
                    out.append(f"{region.name}: {format_bytes(region.used_bytes)} in {region.live} allocation(s)")
        if self._memory.va.used_bytes:
            out.append(f"{self._memory.va.name}: {format_bytes(self._memory.va.used_bytes)} of VA still allocated")
        for node in self.device.iter_pes():
            mapped = node.mmu.table.mapped_bytes
            if mapped:
                out.append(f"{node.mmu.name}: {format_bytes(mapped)} still mapped")
        out += [f"host buffer {name!r} still registered" for name in sorted(self._transfers.host_buffers)]
        return out

    async def _close(self, failing: bool) -> None:
        """Wait for the queue, free every tensor, wait again, then check nothing leaked.

        Work that can never finish (a deadlock) makes a clean close impossible:
        the tensors are marked freed and the :class:`~kbus.DeadlockError` is
        raised without a leak check (the stuck work still holds memory).
        """
        try:
            await self.synchronize()
            for st in list(self._live.values()):
                self.free_storage(st, "device close")
            await self.synchronize()
        except DeadlockError:
            for st in list(self._live.values()):
                st.freed = "device close"
            self._live.clear()
            raise
        finally:
            self._closed = True
            for name in list(self._transfers.host_buffers):
                self._transfers.unregister(name)
        leaks = self._leaks()
        if leaks:
            msg = f"device memory leaked at close of {self._cid}:\n  " + "\n  ".join(leaks)
            if failing:
                warnings.warn(msg, ResourceWarning, stacklevel=2)
            else:
                raise MemoryLeakError(msg)


# ---------------------------------------------------------------------------
# open_device.
# ---------------------------------------------------------------------------


class _DeviceSession:
    """The async context manager returned by :func:`open_device`."""

    def __init__(
        self,
        config: DeviceConfig | str | os.PathLike[str],
        trace: Any,
        trace_ws: Any,
        wire: bool | None,
        record: str | os.PathLike[str] | None = None,
        token: str | None = None,
    ) -> None:
        self._config = config
        self._trace = trace
        self._trace_ws = trace_ws
        self._wire = wire
        self._record = record
        self._token = token
        self._runtime: Runtime | None = None
        self._trace_cm: Any = None
        self._detach: Any = None
        self._frozen = False

    async def __aenter__(self) -> Runtime:
        if self._runtime is not None:
            raise RuntimeError("this open_device() context is already in use; call open_device() again")
        url = _device_url(self._config)
        if url is not None:
            device = await _connect(url, self._config, self._token)
        else:
            cfg = DeviceConfig.load(self._config)
            # Freezing pays for itself only on big devices: it starts with a full collection
            # (tens of ms with numpy and friends loaded), which a small device never earns back.
            self._frozen = cfg.topology.num_pes >= FREEZE_MIN_PES
            device = build_device(Sim(name=cfg.name), cfg, wire=self._wire, freeze=self._frozen)
        try:
            if url is not None and (self._trace is not None or self._trace_ws is not None):
                raise ValueError(
                    f"open_device({url!r}, trace=...): the device runs in another process; "
                    "trace it there (the server's device), not through the connection"
                )
            if self._record is not None:
                from ..remote.record import Recorder

                recorder = Recorder(self._record, device.config.to_toml(), "client" if url else "in-process")
                self._detach = recorder.attach(device)
            runtime = Runtime(device)
            attach = _trace_attacher()
            if attach is not None:
                cm = attach(device, trace=self._trace, trace_ws=self._trace_ws)
                runtime.trace = await cm.__aenter__()
                self._trace_cm = cm
            elif self._trace is not None or self._trace_ws is not None:
                raise NotImplementedError(
                    "open_device(trace=..., trace_ws=...): tracing is not available yet "
                    "(kbus.trace.attach_from_open_device is missing)"
                )
        except BaseException:
            if self._detach is not None:
                self._detach()
            await _close_device(device, self._frozen)
            raise
        self._runtime = runtime
        return runtime

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        rt = self._runtime
        assert rt is not None
        try:
            try:
                # Shielded: an enclosing cancel scope (anyio re-cancels every await
                # in it) must not cut the close short and skip the frees and leak check.
                with anyio.CancelScope(shield=True):
                    await rt._close(failing=e is not None)
            except Exception as exc:
                if e is None:
                    raise
                warnings.warn(
                    f"error while closing the device after another error: {exc!r}", RuntimeWarning, stacklevel=2
                )
        finally:
            try:
                if self._trace_cm is not None:
                    await self._trace_cm.__aexit__(et, e, tb)
            finally:
                if self._detach is not None:
                    self._detach()
                await _close_device(rt.device, self._frozen)


async def _close_device(device: HostDevice, frozen: bool) -> None:
    """Stop the device with the collector paused, then hand its objects back to the collector.

    ``open_device`` builds a device of :data:`FREEZE_MIN_PES` PEs or more with
    ``freeze=True`` (see :func:`~kbus.hw.build_device`), so it sits in the
    permanent generation; stopping its tasks would
    otherwise trigger full collections that walk it again and again.
    ``gc.unfreeze()`` afterwards lets the next collection reclaim it (it also
    unfreezes anything else frozen meanwhile, e.g. another open device: that
    only costs the other device speed, never correctness).
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        await device.aclose()
    finally:
        if paused:
            gc.enable()
        if frozen:
            gc.unfreeze()


def _device_url(config: object) -> str | None:
    """The device server to connect to: ``config`` itself if it is a ``ws://`` URL, else ``KBUS_CONNECT``."""
    from ..remote.client import is_url

    if is_url(config):
        return str(config)
    env = os.environ.get("KBUS_CONNECT", "")
    return env or None


async def _connect(url: str, config: object, token: str | None) -> Any:
    """Connect to ``url``; under ``KBUS_CONNECT`` the server's config must be the one asked for."""
    from ..remote.client import connect_device, is_url

    device = await connect_device(url, token=token)
    if not is_url(config):
        want = DeviceConfig.load(config)  # type: ignore[arg-type]
        if want != device.config:
            await device.aclose()
            raise ConfigError(
                f"KBUS_CONNECT={url} serves device config {device.config.name!r}, but open_device asked for "
                f"{want.name!r} (a different config); serve that config or unset KBUS_CONNECT",
                source=url,
            )
    return device


def _trace_attacher() -> Any:
    try:
        from .. import trace
    except ImportError:  # pragma: no cover - kbus.trace is part of the package
        return None
    return getattr(trace, "attach_from_open_device", None)


def open_device(
    config: DeviceConfig | str | os.PathLike[str] = "default",
    *,
    trace: Any = None,
    trace_ws: Any = None,
    wire: bool | None = None,
    record: str | os.PathLike[str] | None = None,
    token: str | None = None,
) -> _DeviceSession:
    """Open an emulated device: ``async with kbus.open_device("tiny") as torch: ...``.

    ``config`` is a preset name, a TOML path or a :class:`~kbus.hw.DeviceConfig`.
    The simulation runs on the current event loop. ``wire=True`` round-trips
    every message through the codec (slow; proves serializability). ``trace``
    and ``trace_ws`` are handed to ``kbus.trace.attach_from_open_device``.

    ``config`` may also be the URL of a device server (``"ws://127.0.0.1:8766"``,
    see ``kbus serve``): the runtime then drives that device over the socket
    (``token`` or ``KBUS_TOKEN`` authenticates). If the environment variable
    ``KBUS_CONNECT`` holds such a URL, every ``open_device`` connects there
    instead of building a device, and checks that the server's config is the
    one asked for. ``record`` writes every host message and response to a
    ``.kbrec`` recording (see ``kbus replay``).

    On exit the runtime waits for queued work, frees every tensor, checks that
    no device memory or mapping is left (:class:`MemoryLeakError` otherwise)
    and stops every simulated task.
    """
    return _DeviceSession(config, trace, trace_ws, wire, record, token)
