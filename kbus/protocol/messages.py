"""The host<->device protocol: the messages a host sends to the device and back.

These are the kernbench2 messages (same class names, field names, field order,
defaults and ``msg_type`` tags), written anew as frozen, slotted attrs classes.
kbus adds a few optional fields with defaults at the end of some classes; a peer
that only knows the seed protocol never has to send them.

Addressing and broadcast
------------------------
Every request names a SIP and a PE coordinate in it (``dst_*`` for writes,
``src_*`` for reads, DMA probes and responses); the fabric routes the message to
that SIP. Inside the SIP, the PEs that act on the message are
``target_cubes x target_pe``: every cube listed in ``target_cubes`` (or all cubes
for ``"all"``) times the PE index ``target_pe`` (or all PEs for ``"all"``). The
MMU messages name no SIP; they reach every SIP in ``target_sips``. The seed
defaults are ``"all"``, so a message built with defaults *broadcasts*; a unicast
sets ``target_cubes=(cube,)`` and ``target_pe=pe``. The coordinate fields must be
valid even when the targets broadcast. Fan-out happens in the fabric, never in
the host.

Why no validators: messages are built on hot paths (every hop of every request
carries one), so construction does no checking. Bytes from outside the process
are checked by :mod:`kbus.protocol.codec`; values built in-process are checked
by the block that acts on them (which knows the topology and memory sizes).
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import attrs

Targets: TypeAlias = tuple[int, ...] | Literal["all"]
"""Cube or SIP indices a message acts on, or ``"all"`` for every one."""

PeTarget: TypeAlias = int | Literal["all"]
"""The PE index within each targeted cube, or ``"all"`` for every PE."""


@attrs.frozen
class MemoryWriteMsg:
    """Write ``nbytes`` at physical address ``dst_pa`` of each targeted PE's memory.

    The bytes never ride in the message: ``src_kind="pattern"`` fills the range
    from the named ``pattern``; ``src_kind="host_buffer_ref"`` DMAs them from the
    host buffer named ``host_buffer`` (registered with the host port), starting
    at ``host_offset``. Routed to SIP ``dst_sip``; acts on ``target_cubes x
    target_pe`` there (defaults broadcast to every PE of the SIP).
    """

    correlation_id: str
    request_id: str
    dst_sip: int
    dst_cube: int
    dst_pe: int
    dst_pa: int
    nbytes: int
    src_kind: Literal["pattern", "host_buffer_ref"] = "pattern"
    pattern: str | None = None
    target_cubes: Targets = "all"
    target_pe: PeTarget = "all"
    host_buffer: str | None = None
    host_offset: int = 0
    msg_type: Literal["memory_write"] = "memory_write"


@attrs.frozen
class MemoryReadMsg:
    """Read ``nbytes`` at physical address ``src_pa`` and DMA them to the host.

    The bytes land in the host buffer ``host_buffer`` at ``host_offset``. Routed
    to SIP ``src_sip``; acts on ``target_cubes x target_pe`` there. The defaults
    broadcast, so a read of one PE's memory must set ``target_cubes=(cube,)`` and
    ``target_pe=pe``.
    """

    correlation_id: str
    request_id: str
    src_sip: int
    src_cube: int
    src_pe: int
    src_pa: int
    nbytes: int
    target_cubes: Targets = "all"
    target_pe: PeTarget = "all"
    host_buffer: str | None = None
    host_offset: int = 0
    msg_type: Literal["memory_read"] = "memory_read"


@attrs.frozen
class KernelRef:
    """Which kernel a launch runs: a deployed binary or a builtin timing model.

    A ``"deployed"`` kernel's binary was first written to device memory (by a
    MemoryWriteMsg) at ``deploy_pa`` on PE (``deploy_sip``, ``deploy_cube``,
    ``deploy_pe``), ``nbytes_code`` long; a launch references it there and never
    embeds source or IR. A ``"builtin"`` kernel is a simulator timing model
    identified by ``name``.
    """

    name: str
    kind: Literal["deployed", "builtin"]
    deploy_pa: int | None = None
    deploy_sip: int = 0
    deploy_cube: int = 0
    deploy_pe: int = 0
    nbytes_code: int = 0


@attrs.frozen
class TensorArgShard:
    """One shard of a tensor argument: ``nbytes`` at ``pa`` on PE (sip, cube, pe).

    ``offset_bytes`` is where the shard starts within the whole tensor.
    """

    sip: int
    cube: int
    pe: int
    pa: int
    nbytes: int
    offset_bytes: int


@attrs.frozen
class TensorArg:
    """A tensor kernel argument: its shards, and the VA the whole tensor is mapped at.

    Sharded tensors have their mapping broadcast (MmuMapMsg), so a kernel on any
    PE can address the whole contiguous range from ``va_base``.
    """

    shards: tuple[TensorArgShard, ...]
    arg_kind: Literal["tensor"] = "tensor"
    va_base: int = 0


@attrs.frozen
class ScalarArg:
    """A scalar kernel argument, with its device dtype name (``"f32"``, ``"i64"``...)."""

    dtype: str
    value: float | int
    arg_kind: Literal["scalar"] = "scalar"


KernelArg: TypeAlias = TensorArg | ScalarArg
"""A kernel argument; the wire form tells them apart by ``arg_kind``."""


@attrs.frozen
class KernelLaunchMsg:
    """Run ``kernel_ref`` with ``args`` on every targeted PE.

    Acts on ``target_cubes x target_pe`` in every SIP of ``target_sips``
    (defaults: every PE of every SIP). ``target_sips`` is a kbus addition: the
    seed message has no SIP field; fan-out across SIPs happens in the fabric,
    as for MMU messages.
    """

    correlation_id: str
    request_id: str
    kernel_ref: KernelRef
    args: tuple[KernelArg, ...]
    target_cubes: Targets = "all"
    target_pe: PeTarget = "all"
    target_sips: Targets = "all"
    msg_type: Literal["kernel_launch"] = "kernel_launch"


@attrs.frozen
class ResponseMsg:
    """Device->host result of a request, from the PE at (src_sip, src_cube, src_pe).

    ``correlation_id``/``request_id`` repeat the request's. When ``success`` is
    False, ``error`` says why (naming the block, coordinates, address or field).
    ``value`` carries a small scalar result, for example a probe's latency in
    picoseconds.
    """

    correlation_id: str
    request_id: str
    src_cube: int
    src_pe: int
    success: bool
    error: str | None = None
    src_sip: int = 0
    value: int | float | None = None
    msg_type: Literal["response"] = "response"


@attrs.frozen
class PeDmaMsg:
    """Inject one transfer directly at the PE_DMA of PE (src_sip, src_cube, src_pe).

    Reads (``is_write=False``) or writes ``nbytes`` at ``dst_pa``, bypassing the
    PE_CPU -> scheduler -> DMA pipeline; the probe utility uses it to measure
    PE->memory latency. Always unicast: it has no target fields.
    """

    correlation_id: str
    request_id: str
    src_sip: int
    src_cube: int
    src_pe: int
    dst_pa: int
    nbytes: int
    is_write: bool = False
    msg_type: Literal["pe_dma"] = "pe_dma"


@attrs.frozen
class MapEntry:
    """One VA->PA mapping of ``size`` bytes, owned by PE (sip, cube, pe).

    The owner fields are a kbus addition (the seed entries are plain
    ``{"va", "pa", "size"}`` dicts). An owner field left out (None) means the
    PE installing the entry, as the seed's ``replicate=local`` maps do: a
    seed-form entry sent to sip0.cube1.pe3 names sip0.cube1.pe3's memory.
    Sharded tensors broadcast entries with every owner field set.
    """

    va: int
    pa: int
    size: int
    sip: int | None = None
    cube: int | None = None
    pe: int | None = None


@attrs.frozen
class UnmapEntry:
    """One VA range of ``size`` bytes to unmap."""

    va: int
    size: int


@attrs.frozen
class MmuMapMsg:
    """Install VA->PA ``entries`` in the PE_MMU of every targeted PE.

    Travels Host -> PCIE_EP -> IO_CPU -> M_CPU -> NOC -> PE_MMU. Reaches every SIP
    in ``target_sips`` and, in each, acts on ``target_cubes x target_pe``
    (defaults: every PE of every SIP). Replicated tensors map locally; sharded
    tensors broadcast so any PE can translate the whole range.
    """

    correlation_id: str
    request_id: str
    entries: tuple[MapEntry, ...]
    target_sips: Targets = "all"
    target_cubes: Targets = "all"
    target_pe: PeTarget = "all"
    msg_type: Literal["mmu_map"] = "mmu_map"


@attrs.frozen
class MmuUnmapMsg:
    """Remove the VA ranges in ``entries`` from the PE_MMU of every targeted PE.

    Targets broadcast exactly as for :class:`MmuMapMsg`.
    """

    correlation_id: str
    request_id: str
    entries: tuple[UnmapEntry, ...]
    target_sips: Targets = "all"
    target_cubes: Targets = "all"
    target_pe: PeTarget = "all"
    msg_type: Literal["mmu_unmap"] = "mmu_unmap"


HostMessage: TypeAlias = MemoryWriteMsg | MemoryReadMsg | KernelLaunchMsg | PeDmaMsg | MmuMapMsg | MmuUnmapMsg
"""A request the host sends to the device."""

Message: TypeAlias = HostMessage | ResponseMsg
"""Anything that crosses the host<->device boundary."""

# Resolve the string annotations (``from __future__ import annotations``) once,
# at import, so the codec and introspection see real types.
for _cls in (
    MemoryWriteMsg,
    MemoryReadMsg,
    KernelRef,
    TensorArgShard,
    TensorArg,
    ScalarArg,
    KernelLaunchMsg,
    ResponseMsg,
    PeDmaMsg,
    MapEntry,
    UnmapEntry,
    MmuMapMsg,
    MmuUnmapMsg,
):
    attrs.resolve_types(_cls)
del _cls

__all__ = [
    "HostMessage",
    "KernelArg",
    "KernelLaunchMsg",
    "KernelRef",
    "MapEntry",
    "MemoryReadMsg",
    "MemoryWriteMsg",
    "Message",
    "MmuMapMsg",
    "MmuUnmapMsg",
    "PeDmaMsg",
    "PeTarget",
    "ResponseMsg",
    "ScalarArg",
    "Targets",
    "TensorArg",
    "TensorArgShard",
    "UnmapEntry",
]
