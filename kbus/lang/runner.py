"""The device side: per-device state, placement rules, and the PE_CPU resolver.

When a ``KernelLaunchMsg`` with ``KernelRef(kind="deployed")`` reaches a PE,
PE_CPU calls :func:`run_deployed` (installed as ``Device.deployed_resolver``).
It fetches the code blob by DMA (unless this PE has it cached), checks it,
resolves it to a registered :class:`~kbus.lang.kernel.Kernel`, decodes the
arguments, works out which program instances are its own from the message
alone, and runs them: as one batched run of the body when it can (see
:mod:`~kbus.lang.batch`), else one after another.

Wire layout of a launch's ``args``: one group per kernel parameter, in
signature order, then the launch values. The groups follow the argument
convention of :mod:`kbus.runtime.builtins`, so one convention serves the
builtin kernels and this language::

    tensor    TensorArg(shards, va_base), ScalarArg(<dtype>, ndim),
              ScalarArg("i64", size) x ndim, ScalarArg("i64", shard_dim)  # -1: replicated
    scalar    ScalarArg(<dtype>, value) for a numpy scalar; ScalarArg("int" | "float",
    constexpr value) for a Python number (bools travel as "int" 0/1)
    then      ScalarArg("i64", grid0), ("i64", grid1), ("i64", grid2),
              ScalarArg("i64", placement)                                  # 0 spread, 1 owner
    optional  ScalarArg("i64", batch mode)                                 # 1 off; absent: auto

Placement (which PE runs program instance ``i``, linear id
``pid0 + g0 * (pid1 + g1 * pid2)``):

* spread: the targeted PEs in (sip, cube, pe) order are slots ``0..T-1``;
  instance ``i`` runs in slot ``i % T``;
* owner: instance ``(pid0, ...)`` runs on the PE owning byte
  ``pid0 * nbytes // grid0`` of the first tensor argument (for replicated
  shards, replica ``pid0 % replicas``). For the usual one-block-per-program
  kernels this is the PE holding the block the program starts on.
"""

from __future__ import annotations

import itertools
import traceback
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import DeviceError, OutOfDeviceMemory
from ..mem import MemoryStore, PageFault, Segment
from ..protocol import KernelLaunchMsg, KernelRef, ScalarArg, TensorArg, TensorArgShard
from .batch import BatchContext, Overlap, Unbatchable
from .kernel import MAX_BLOB, BlobError, Kernel, KernelId, decode_blob, lookup
from .language import DTYPES, Pointer
from .memory import Layout, ProgramContext, SegmentCache

if TYPE_CHECKING:
    from ..hw.blocks import PeCpu
    from ..hw.config import DeviceConfig
    from ..hw.device import HostDevice
    from ..hw.network import NetLink
    from ..protocol.messages import PeTarget, Targets
    from ..sim import SimFuture

__all__ = [
    "BATCH_MODES",
    "PLACEMENTS",
    "Deployment",
    "DeviceState",
    "code_region",
    "owner_of_programs",
    "run_deployed",
    "state_of",
]

Coord = tuple[int, int, int]
PLACEMENTS = {"spread": 0, "owner": 1}
_PLACEMENT_NAMES = {v: k for k, v in PLACEMENTS.items()}
BATCH_MODES = {"auto": 0, "off": 1}
"""How a PE runs its instances: batched when the kernel allows it (``"auto"``), or one by one (``"off"``)."""
_BATCH_NAMES = {v: k for k, v in BATCH_MODES.items()}
FIRST_BATCH = 16
"""Instances in a PE's first batch of a launch; later batches are sized from the lanes it used."""
BATCH_LANES = 1 << 21
"""Lanes (all instances) a batch aims at per access: bounds the memory of its arrays."""
MAX_BATCH = 1024
"""Most instances in one batch."""

CODE_REGION_MAX = 1 << 20
_LANG_DIR = str(Path(__file__).resolve().parent)


def code_region(config: DeviceConfig) -> tuple[Coord, int, int]:
    """Where deployed kernel code lives: ``(coord, pa, nbytes)``, the top of the last PE's HBM slice.

    The region is ``min(1 MiB, hbm_per_pe // 8)`` bytes at the top of the HBM
    slice of the device's last PE (the one furthest from where placements
    start, so it rarely competes with tensors); the runtime's allocator for
    that PE stops below it.
    """
    mem = config.memory
    topo = config.topology
    size = min(CODE_REGION_MAX, mem.hbm_per_pe // 8)
    size -= size % 64
    coord = (topo.sips - 1, topo.cubes_per_sip - 1, topo.pes_per_cube - 1)
    return coord, mem.hbm_base + mem.hbm_per_pe - size, size


@attrs.frozen(repr=False)
class Deployment:
    """A kernel's code blob in device memory: owner PE, PA, size and the blob's SHA-256."""

    kernel_id: KernelId
    coord: Coord
    pa: int
    nbytes: int
    sha256: str

    def ref(self) -> KernelRef:
        """The ``KernelRef`` a launch sends: the location, never the code."""
        s, c, p = self.coord
        return KernelRef(
            self.kernel_id.name,
            "deployed",
            deploy_pa=self.pa,
            deploy_sip=s,
            deploy_cube=c,
            deploy_pe=p,
            nbytes_code=self.nbytes,
        )

    def __repr__(self) -> str:
        s, c, p = self.coord
        return f"<Deployment {self.kernel_id} at sip{s}.cube{c}.pe{p} PA {self.pa:#x} ({self.nbytes} B)>"


class DeviceState:
    """Everything the kernel language keeps per device (host program cache, PE code caches, counters)."""

    def __init__(self, device: HostDevice) -> None:
        coord, base, size = code_region(device.config)
        self.code_coord = coord
        self.code_base = base
        self.code_end = base + size
        self.code_next = base
        # host side
        self.programs: dict[KernelId, Deployment] = {}
        self.deploying: dict[KernelId, SimFuture[Deployment]] = {}
        """Deployments being written now: a concurrent first launch waits on it instead of writing again."""
        self.hits = 0
        self.misses = 0
        self.deployments = 0
        self.request_ids = itertools.count()
        """Numbers of this device's deploy and launch requests: per device, so that a script sends
        the same messages (same bytes, same virtual times) whatever ran before it in the process."""
        # device side
        self.pe_code: dict[Coord, dict[tuple[Any, ...], Kernel]] = {}
        self.pe_fetches = 0
        self.pe_hits = 0
        self.batched = 0
        """PE shares of launches run batched (several instances, one run of the body)."""
        self.per_instance = 0
        """PE shares of launches run one instance at a time."""
        self.fallbacks: dict[str, str] = {}
        """Kernel name -> why its last batch attempt ran per instance instead."""
        self.unbatchable: dict[tuple[KernelId, tuple[Any, ...]], str] = {}
        """Kernels (with their scalar arguments) whose body cannot run batched: not tried again."""
        self.written: dict[str, set[str]] = {}
        """Launch request id -> names of the pointer parameters its instances stored through."""
        self.paths: dict[tuple[Coord, Coord, bool, bool], tuple[list[NetLink], list[NetLink]]] = {}
        self.stores: dict[tuple[int, int, int, bool], MemoryStore] = {}
        self.last_launch: tuple[tuple[KernelRef, tuple[Any, ...]], _Launch, npt.NDArray[np.int64] | None] | None = None
        """The decoded form of the launch most recently received, keyed by its code reference and
        arguments: every PE of a launch decodes the same message to the same values, so the first
        PE's work is reused (a pure memo; an equal message decodes equally)."""

    def alloc_code(self, nbytes: int) -> int:
        """A 64-byte aligned PA in the code region (bump allocation: code is never freed or overwritten)."""
        size = -(-nbytes // 64) * 64
        if self.code_next + size > self.code_end:
            s, c, p = self.code_coord
            where = f"kernel code region of sip{s}.cube{c}.pe{p} HBM [{self.code_base:#x}, {self.code_end:#x})"
            free = self.code_end - self.code_next
            raise OutOfDeviceMemory(
                f"{where}: no room for a {nbytes}-byte kernel blob ({free} bytes left)",
                where=where,
                requested=nbytes,
                free=free,
                largest=free,
            )
        pa = self.code_next
        self.code_next += size
        return pa


_STATES: weakref.WeakKeyDictionary[HostDevice, DeviceState] = weakref.WeakKeyDictionary()


def state_of(device: HostDevice) -> DeviceState:
    """The kernel-language state of ``device``, created (and the resolver installed) on first use."""
    st = _STATES.get(device)
    if st is None:
        current = device.deployed_resolver
        if current is not None and current is not run_deployed:
            raise RuntimeError(
                f"device {device.config.name!r} already has a deployed-kernel resolver ({current!r}); "
                "kbus.lang cannot install its own"
            )
        device.deployed_resolver = run_deployed
        st = _STATES[device] = DeviceState(device)
    return st


# ----------------------------------------------------------------- placement
def linear_pe(config: DeviceConfig, coord: Coord) -> int:
    """Index of PE ``coord`` in (sip, cube, pe) order."""
    t = config.topology
    s, c, p = coord
    return (s * t.cubes_per_sip + c) * t.pes_per_cube + p


def owner_of_programs(shards: Sequence[TensorArgShard], grid0: int, config: DeviceConfig) -> npt.NDArray[np.int64]:
    """For each ``pid0`` in ``range(grid0)``, the linear index of the PE that owns its block (owner rule)."""
    total = max(s.offset_bytes + s.nbytes for s in shards)
    groups: dict[tuple[int, int], list[int]] = {}
    for s in shards:
        groups.setdefault((s.offset_bytes, s.nbytes), []).append(linear_pe(config, (s.sip, s.cube, s.pe)))
    keys = sorted(groups)
    starts = np.array([k[0] for k in keys], dtype=np.int64)
    counts = np.array([len(groups[k]) for k in keys], dtype=np.int64)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    flat = np.array([pe for k in keys for pe in groups[k]], dtype=np.int64)
    pid = np.arange(grid0, dtype=np.int64)
    byte = (pid * total) // max(grid0, 1)
    which = np.clip(np.searchsorted(starts, byte, side="right") - 1, 0, len(keys) - 1)
    out: npt.NDArray[np.int64] = flat[first[which] + pid % counts[which]]
    return out


def spread_targets(config: DeviceConfig, n: int) -> tuple[Targets, Targets, PeTarget]:
    """``(target_sips, target_cubes, target_pe)`` for ``n`` instances spread round-robin.

    Every PE when there are at least as many instances; otherwise the
    smallest product of SIP and cube prefixes (one PE per cube while that is
    enough), so a small launch does not wake the whole device.
    """
    t = config.topology
    S, C, P = t.sips, t.cubes_per_sip, t.pes_per_cube
    if n >= S * C * P:
        return "all", "all", "all"
    if n <= S * C:
        j = min(S, n)
        k = -(-n // j)
        return _prefix(j, S), _prefix(k, C), 0
    return "all", _prefix(-(-n // (S * P)), C), "all"


def _prefix(k: int, n: int) -> Targets:
    return "all" if k >= n else tuple(range(k))


def owner_targets(owners: npt.NDArray[np.int64], config: DeviceConfig) -> tuple[Targets, Targets, PeTarget]:
    """The smallest (sips x cubes x pe) product covering every owner PE."""
    t = config.topology
    pe = owners % t.pes_per_cube
    cube = (owners // t.pes_per_cube) % t.cubes_per_sip
    sip = owners // (t.pes_per_cube * t.cubes_per_sip)
    sips = tuple(int(x) for x in np.unique(sip))
    cubes = tuple(int(x) for x in np.unique(cube))
    pes = np.unique(pe)
    return (
        "all" if len(sips) == t.sips else sips,
        "all" if len(cubes) == t.cubes_per_sip else cubes,
        int(pes[0]) if pes.size == 1 else "all",
    )


# ------------------------------------------------------------------ decoding
class LaunchFormatError(ValueError):
    """The launch message does not fit the kernel's signature (names the argument)."""


class _Launch:
    __slots__ = ("batch", "first_tensor", "grid", "placement", "scalars", "values")

    def __init__(
        self,
        values: dict[str, Any],
        grid: tuple[int, int, int],
        placement: str,
        first_tensor: TensorArg | None,
        batch: str = "auto",
        scalars: tuple[Any, ...] = (),
    ) -> None:
        self.values = values
        self.grid = grid
        self.placement = placement
        self.first_tensor = first_tensor
        self.batch = batch
        self.scalars = scalars
        """Every scalar argument of the launch (with the grid): what a kernel's control flow may depend on."""


_INT_OF_SIZE: dict[int, np.dtype[Any]] = {2: np.dtype(np.int16), 4: np.dtype(np.int32), 8: np.dtype(np.int64)}


def decode_scalar(arg: ScalarArg, where: str) -> Any:
    """A scalar argument's value: Python ``int``/``float`` for ``"int"``/``"float"``, else a numpy scalar.

    ``"<name>.bits"`` carries a NaN or infinity as the integer of its IEEE bits.
    """
    name, value = arg.dtype, arg.value
    if name.endswith(".bits"):
        base = name[: -len(".bits")]
        dt = np.dtype(np.float64) if base == "float" else DTYPES.get(base)
        if dt is None or dt.kind != "f" or isinstance(value, bool) or not isinstance(value, int):
            raise LaunchFormatError(f"{where}: bad non-finite float argument {arg!r}")
        bits = np.asarray(value, dtype=_INT_OF_SIZE[dt.itemsize]).view(dt)
        return float(bits) if base == "float" else dt.type(bits)
    if name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise LaunchFormatError(f"{where}: 'int' scalar {value!r} is not an integer")
        return value
    if name == "float":
        return float(value)
    dt = DTYPES.get(name)
    if dt is None:
        raise LaunchFormatError(f"{where}: unknown scalar dtype {name!r} (known: int, float, {', '.join(DTYPES)})")
    return dt.type(value)


class _Reader:
    """Takes a launch's args in order; every error names the position."""

    __slots__ = ("args", "i")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.i = 0

    def take(self, what: str) -> Any:
        if self.i >= len(self.args):
            raise LaunchFormatError(f"args[{self.i}] ({what}) is missing: the launch has {len(self.args)} args")
        arg = self.args[self.i]
        self.i += 1
        return arg

    def int(self, what: str, minimum: int | None = None) -> int:
        pos = self.i
        arg = self.take(what)
        if not isinstance(arg, ScalarArg) or isinstance(arg.value, bool) or not isinstance(arg.value, int):
            raise LaunchFormatError(f"args[{pos}] ({what}): expected an integer ScalarArg, got {arg!r}")
        if minimum is not None and arg.value < minimum:
            raise LaunchFormatError(f"args[{pos}] ({what}): {arg.value} is below {minimum}")
        return arg.value


def decode_launch(kern: Kernel, args: tuple[Any, ...], page_size: int) -> _Launch:
    """Split a launch's ``args`` into parameter values, grid and placement (see the module docstring)."""
    rd = _Reader(args)
    values: dict[str, Any] = {}
    first: TensorArg | None = None
    for p in kern.params:
        pos = rd.i
        arg = rd.take(p.name)
        where = f"args[{pos}] ({p.name})"
        if isinstance(arg, TensorArg):
            if p.constexpr:
                raise LaunchFormatError(f"{where}: constexpr parameter got a tensor")
            head = rd.take(f"{p.name} dtype/rank")
            if not isinstance(head, ScalarArg) or head.dtype not in DTYPES:
                raise LaunchFormatError(
                    f"args[{pos + 1}]: expected ScalarArg(<dtype>, ndim) after {where}, got {head!r}"
                )
            ndim = head.value
            if isinstance(ndim, bool) or not isinstance(ndim, int) or not 0 <= ndim <= 32:
                raise LaunchFormatError(f"args[{pos + 1}]: tensor rank {ndim!r} of {where} is not an int in 0..32")
            shape = tuple(rd.int(f"{p.name} shape[{d}]", 0) for d in range(ndim))
            shard_dim = rd.int(f"{p.name} shard dim", -1)
            layout = Layout(DTYPES[head.dtype], arg.va_base, shape, shard_dim, arg.shards, page_size)
            values[p.name] = Pointer(layout, 0, p.name)
            if first is None:
                first = arg
        elif isinstance(arg, ScalarArg):
            values[p.name] = decode_scalar(arg, where)
        else:
            raise LaunchFormatError(f"{where}: expected a TensorArg or ScalarArg, got {type(arg).__name__}")
    grid = (rd.int("grid0", 0), rd.int("grid1", 0), rd.int("grid2", 0))
    pos = rd.i
    code = rd.int("placement", 0)
    placement = _PLACEMENT_NAMES.get(code)
    if placement is None:
        raise LaunchFormatError(f"args[{pos}]: unknown placement code {code}")
    batch = "auto"
    if rd.i < len(args):
        pos = rd.i
        code = rd.int("batch", 0)
        found = _BATCH_NAMES.get(code)
        if found is None:
            raise LaunchFormatError(f"args[{pos}]: unknown batch mode code {code}")
        batch = found
    if rd.i != len(args):
        raise LaunchFormatError(f"{len(args) - rd.i} unexpected args after args[{rd.i - 1}] (batch mode)")
    scalars = tuple((a.dtype, a.value) for a in args if isinstance(a, ScalarArg))
    return _Launch(values, grid, placement, first, batch, scalars)


def my_instances(cpu: PeCpu, msg: KernelLaunchMsg, launch: _Launch, owners: npt.NDArray[np.int64] | None) -> list[int]:
    """Linear ids of the program instances this PE runs, ascending (see the module docstring)."""
    dev = cpu.device
    g0, g1, g2 = launch.grid
    total = g0 * g1 * g2
    me = (cpu.sip, cpu.cube, cpu.pe)
    if owners is not None:
        mine = np.flatnonzero(owners == linear_pe(dev.config, me))
        if mine.size == 0:
            return []
        rest = np.arange(g1 * g2, dtype=np.int64) * g0
        ids: list[int] = (rest[:, None] + mine[None, :]).reshape(-1).tolist()
        return ids
    slots = [(s, c, p) for s in dev.target_sips(msg) for c in dev.target_cubes(msg) for p in dev.target_pes(msg)]
    slot = slots.index(me)
    return list(range(slot, total, len(slots)))


# ---------------------------------------------------------------- resolver
async def _program(cpu: PeCpu, ref: KernelRef, st: DeviceState) -> tuple[Kernel | None, str | None]:
    """The kernel a deployed ref names: from this PE's code cache, or fetched by DMA and checked."""
    me = (cpu.sip, cpu.cube, cpu.pe)
    key = (ref.deploy_sip, ref.deploy_cube, ref.deploy_pe, ref.deploy_pa, ref.nbytes_code, ref.name)
    cache = st.pe_code.setdefault(me, {})
    found = cache.get(key)
    if found is not None:
        st.pe_hits += 1
        return found, None
    head = f"{cpu.name}: kernel {ref.name!r}"
    pa, n = ref.deploy_pa, ref.nbytes_code
    if pa is None:
        return None, f"{head}: the KernelRef has no deploy_pa"
    where = f"sip{ref.deploy_sip}.cube{ref.deploy_cube}.pe{ref.deploy_pe} PA {pa:#x}"
    if not 0 < n <= MAX_BLOB:
        return None, f"{head}: nbytes_code={n} for the code at {where} is outside (0, {MAX_BLOB}]"
    try:
        cpu.device.config.check_coords(ref.deploy_sip, ref.deploy_cube, ref.deploy_pe)
        seg = Segment(0, ref.deploy_sip, ref.deploy_cube, ref.deploy_pe, pa, n)
        data = await cpu.device.read_physical(me, seg)
    except (DeviceError, ValueError) as exc:
        return None, f"{head}: cannot fetch the code blob at {where}: {exc}"
    st.pe_fetches += 1
    try:
        kid, params = decode_blob(data.tobytes(), n)
        if kid.name != ref.name:
            raise BlobError(f"it holds kernel {kid.name!r}, the launch names {ref.name!r}")
        kern = lookup(kid)
        if kern is None:
            return None, f"{head}: the code blob at {where} names kernel {kid}, which is not registered in this process"
        if params != [(p.name, p.constexpr) for p in kern.params]:
            raise BlobError(f"its parameter list {params} differs from the registered kernel's")
    except BlobError as exc:
        return None, f"{head}: bad code blob at {where}: {exc}"
    cache[key] = kern
    return kern, None


def _user_frame(exc: BaseException) -> str:
    """``file:line`` of the innermost frame outside kbus.lang and numpy, for error messages."""
    best = ""
    for fs in traceback.extract_tb(exc.__traceback__):
        fname = fs.filename
        if fname.startswith(_LANG_DIR) or "numpy" in Path(fname).parts:
            continue
        best = f"{Path(fname).name}:{fs.lineno}"
    return f" [at {best}]" if best else ""


def _pid(launch: _Launch, linear: int) -> tuple[int, int, int]:
    g0, g1, _ = launch.grid
    return (linear % g0, (linear // g0) % g1, linear // (g0 * g1))


def _context(
    cpu: PeCpu, kern: Kernel, launch: _Launch, pid: tuple[int, int, int], st: DeviceState, cache: SegmentCache | None
) -> ProgramContext:
    """An instance's context; ``cache`` None translates through the PE's DMA engine directly."""
    dev = cpu.device
    node = dev.pes[cpu.sip][cpu.cube][cpu.pe]
    return ProgramContext(dev, node, kern.short_name, pid, launch.grid, cpu.sim.now, st.paths, st.stores, cache)


async def _run_instance(
    cpu: PeCpu,
    kern: Kernel,
    launch: _Launch,
    linear: int,
    st: DeviceState,
    cache: SegmentCache | None,
    written: set[str],
) -> str | None:
    """Run one program instance synchronously, then sleep until its accounted end; return an error or None."""
    pid = _pid(launch, linear)
    ctx = _context(cpu, kern, launch, pid, st, cache)
    tracer = cpu.sim.tracer
    if tracer is not None:
        tracer.emit("kernel", kern.short_name, cpu.name, ctx.start, None, {"program_id": list(pid)})
    error: str | None = None
    head = f"{cpu.name}: kernel {kern.short_name!r} program {pid}"
    with ctx:
        try:
            result = kern.fn(**launch.values)
            if result is not None:
                error = (
                    f"{head} returned a {type(result).__name__}; a kernel returns nothing and writes "
                    "its results with kl.store"
                )
        except PageFault as exc:
            error = f"{head} faulted at VA {exc.va:#x}: {exc}{_user_frame(exc)}"
        except Exception as exc:
            error = f"{head} raised {type(exc).__name__}: {exc}{_user_frame(exc)}"
        ctx.flush_compute()
    written |= ctx.stored
    await _replay(cpu, kern, ctx, error)
    return error


async def _replay(cpu: PeCpu, kern: Kernel, ctx: ProgramContext, error: str | None) -> None:
    """Pay an executed instance's timeline in virtual time; busy time and the trace span."""
    start = ctx.start
    end = await ctx.replay()
    # The whole instance occupies the PE_CPU: count it as busy time, reported once.
    cpu.busy_ps += end - start
    if cpu.on_busy is not None:
        cpu.on_busy(cpu, start, end, f"kernel {kern.short_name}")
    tracer = cpu.sim.tracer
    if tracer is not None:
        tracer.emit(
            "kernel",
            kern.short_name,
            cpu.name,
            start,
            end - start,
            {
                "program_id": list(ctx.pid),
                "flops": ctx.flops_total,
                "bytes_loaded": ctx.bytes_loaded,
                "bytes_stored": ctx.bytes_stored,
                "dma_commands": ctx.dma_commands,
                "error": error,
            },
        )


def _batch(
    cpu: PeCpu, kern: Kernel, launch: _Launch, ids: list[int], st: DeviceState, cache: SegmentCache, written: set[str]
) -> BatchContext | tuple[str, bool]:
    """Run the body once for all ``ids`` (see :mod:`kbus.lang.batch`): the batch (executed), or why not.

    Why not is ``(reason, static)``: static reasons are properties of the
    code and its scalar arguments (trying again would fail again). On any
    failure nothing is left behind: the batch's stores are undone and its
    translations uncharged, so the instances can run one by one.
    """
    if cpu.device.pes[cpu.sip][cpu.cube][cpu.pe].engine.tlb_entries:
        return "the PE's DMA engine has a TLB, whose state depends on the order of translations", True
    pids = [_pid(launch, i) for i in ids]
    contexts = [_context(cpu, kern, launch, pid, st, cache) for pid in pids]
    data = _context(cpu, kern, launch, pids[0], st, cache)
    bctx = BatchContext(contexts, np.array(pids, dtype=np.int64), cache, data)
    try:
        with bctx:
            result = kern.fn(**launch.values)
            if result is not None:
                raise Unbatchable(f"the kernel returned a {type(result).__name__}")
            bctx.finish()
    except Exception as exc:
        bctx.abort()
        if isinstance(exc, Unbatchable):
            return str(exc) + _user_frame(exc), not isinstance(exc, Overlap)
        msg = (
            f"an instance raised {type(exc).__name__}: {exc}{_user_frame(exc)} (each instance runs alone to report it)"
        )
        return msg, False
    written |= bctx.stored
    return bctx


def _decoded(
    cpu: PeCpu, kern: Kernel, msg: KernelLaunchMsg, st: DeviceState
) -> tuple[_Launch, npt.NDArray[np.int64] | None]:
    """The launch's values and, for owner placement, the owner of each pid0 (memoized per message)."""
    key = (msg.kernel_ref, msg.args)
    last = st.last_launch
    # The PEs of one launch usually hold the very same message objects: compare by identity first.
    if last is not None and ((last[0][0] is key[0] and last[0][1] is key[1]) or last[0] == key):
        return last[1], last[2]
    launch = decode_launch(kern, msg.args, cpu.device.config.memory.page_size)
    owners = None
    first = launch.first_tensor
    if launch.placement == "owner" and first is not None and first.shards:
        owners = owner_of_programs(first.shards, launch.grid[0], cpu.device.config)
    st.last_launch = (key, launch, owners)
    return launch, owners


async def run_deployed(cpu: PeCpu, msg: KernelLaunchMsg) -> tuple[str | None, Any]:
    """PE_CPU's handler for deployed kernels: fetch/check the code, run this PE's instances.

    Returns ``(error, instances run)``; the first failing instance stops this
    PE's share of the launch and its error is the PE's answer.
    """
    st = state_of(cpu.device)
    kern, error = await _program(cpu, msg.kernel_ref, st)
    if kern is None:
        return error, None
    try:
        launch, owners = _decoded(cpu, kern, msg, st)
        ids = my_instances(cpu, msg, launch, owners)
    except (LaunchFormatError, ValueError) as exc:
        return f"{cpu.name}: kernel {kern.short_name!r}: malformed launch: {exc}", None
    written = st.written.setdefault(msg.request_id, set())
    done = 0  # instances of `ids` run so far (batched)
    if len(ids) > 1 and launch.batch == "auto":
        key = (kern.id, launch.scalars)
        reason = st.unbatchable.get(key)
        chunk = FIRST_BATCH
        while reason is None and len(ids) - done > 1:
            part = ids[done : done + chunk]
            cache = SegmentCache(cpu.device.pes[cpu.sip][cpu.cube][cpu.pe])
            outcome = _batch(cpu, kern, launch, part, st, cache, written)
            if not isinstance(outcome, BatchContext):
                reason, static = outcome
                if static:
                    st.unbatchable[key] = reason  # a property of the code: do not try again
                break
            if done == 0:
                st.batched += 1
            tracer = cpu.sim.tracer
            for ctx in outcome.contexts:
                ctx.start = cpu.sim.now
                if tracer is not None:
                    tracer.emit(
                        "kernel",
                        kern.short_name,
                        cpu.name,
                        ctx.start,
                        None,
                        {"program_id": list(ctx.pid), "batched": len(part)},
                    )
                await _replay(cpu, kern, ctx, None)
            done += len(part)
            # Next batch: as many instances as keep its arrays near BATCH_LANES lanes.
            lanes = max(1, outcome.lanes)
            chunk = max(2, min(MAX_BATCH, BATCH_LANES // lanes))
        if reason is not None:
            st.fallbacks[kern.short_name] = f"{cpu.name}: {reason}"
            tracer = cpu.sim.tracer
            if tracer is not None:
                tracer.emit(
                    "kernel",
                    kern.short_name,
                    cpu.name,
                    cpu.sim.now,
                    None,
                    {"batch_fallback": st.fallbacks[kern.short_name], "instances": len(ids) - done},
                )
    if done < len(ids):
        st.per_instance += 1
    for linear in ids[done:]:
        error = await _run_instance(cpu, kern, launch, linear, st, None, written)
        if error is not None:
            return error, None
    return None, len(ids)
