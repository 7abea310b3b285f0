"""Device configuration: every count, size and timing of the emulated accelerator.

All the numbers that shape a simulation live in one immutable
:class:`DeviceConfig`, loaded from a TOML file or a shipped preset (``tiny``,
``default``, ``large`` in ``kbus/hw/presets/``). Keeping them in one place is
what makes every figure a user sees explainable: ``kbus info`` prints this
configuration, and nothing else in the emulator invents a delay.

Units
-----
Files use human units; the loaded object holds plain integers, so nothing
downstream parses strings or does float arithmetic on time:

* durations: ``"12ns"``, ``"1.5us"``, ``"250ps"`` (units ps, ns, us, ms, s) ->
  int **picoseconds**. A bare number is rejected: ``latency = 12`` is
  ambiguous.
* bandwidths: ``"64GB/s"``, ``"12.5GiB/s"`` (B, KB, MB, GB, TB per second are
  powers of 1000; KiB, MiB, GiB, TiB powers of 1024) -> int **bytes per second**.
  A bare number is rejected.
* sizes: ``"64KiB"``, ``"4MiB"``, ``"1GB"`` or a bare integer number of bytes ->
  int **bytes**.
* addresses and counts: TOML integers (``0x10_0000_0000`` is fine); strings,
  floats and booleans are rejected.

Keys
----
Every key is optional; a missing key keeps the value of the ``default`` preset
(a file may override a single latency). The values of each preset are in
``kbus/hw/presets/*.toml``, and ``kbus info`` prints the resolved ones. Unknown keys are errors, so a typo never
silently falls back to a default.

``name``                      free text naming the configuration (defaults to
                              the file's stem for a file, ``"default"`` otherwise)

``[topology]``
  ``sips``                    SIP chips on the board (>= 1)
  ``cubes_per_sip``           cubes in each SIP (>= 1)
  ``pes_per_cube``            processing elements (PEs) in each cube (>= 1);
                              sips x cubes_per_sip x pes_per_cube <= 65536
  ``cube_network``            how a SIP's cubes connect: ``ring`` (short way
                              round), ``mesh2d`` or ``torus2d`` (dimension-order
                              routing: along the row, then the column)
  ``cube_cols``               columns of the mesh2d/torus2d grid (must divide
                              cubes_per_sip; cube i is at row i // cube_cols)
  ``sip_network``             SIP data links: ``full`` (a pair between every two
                              SIPs) or ``ring``; they join the cube-0 NOCs

``[memory]`` (per PE; physical addresses are PE-local)
  ``sram_per_pe``             size of each PE's SRAM, at physical addresses
                              ``[0, sram_per_pe)``
  ``hbm_per_pe``              size of the HBM slice owned by each PE
  ``hbm_base``                physical address where that HBM slice starts;
                              an integer >= sram_per_pe (no overlap with SRAM),
                              page aligned, and hbm_base + hbm_per_pe <= 2**64
  ``page_size``               MMU page size: a power of two >= 4KiB
  ``va_base``                 first device virtual address handed to tensors
                              (integer, page aligned)
  ``va_size``                 size of the device virtual address range (a
                              multiple of page_size; va_base + va_size <= 2**64)

  ``hbm_scope``               ``cube``: each cube has one HBM shared by its PEs;
                              ``sip``: one HBM shared by all PEs of the SIP
  ``hbm_channels``            channels of one HBM; addresses are interleaved over
                              all of them, so a transfer sees their sum
  ``hbm_channel_bandwidth``   bandwidth of one channel
  ``hbm_latency``             access latency of HBM (added once per transfer)
  ``sram_bandwidth``          bandwidth of one PE's SRAM (shared by its own and
                              remote PEs' transfers)
  ``sram_latency``            access latency of SRAM

``[fabric]``
  ``inbox_capacity``          messages each block's inbox holds before senders
                              block (backpressure); >= 1
  ``msg_bytes``               bytes one message descriptor occupies on a link
                              (what a control message costs in bandwidth); >= 1
  ``map_entry_bytes``         bytes each MmuMap/MmuUnmap entry adds to its message
  ``model``                   ``flow`` (max-min fair sharing, the default) or
                              ``packet`` (cut-through packets, FCFS per link; the
                              slow reference that validates the flow model)
  ``packet_bytes``            packet size of the packet model

``[links.<level>]`` each with ``latency`` (duration, >= 0: fixed delay of one
hop) and ``bandwidth`` (> 0: serialization rate, so ``nbytes`` occupy the link
for ``ceil(nbytes / bandwidth)``). Levels:
  ``host_pcie``               host <-> PCIE_EP (the PCIe bus)
  ``pcie_io``                 PCIE_EP <-> IO_CPU inside a SIP
  ``io_mcpu``                 IO_CPU <-> each cube's M_CPU
  ``mcpu_noc``                M_CPU <-> the cube's NOC router
  ``noc_hop``                 NOC <-> NOC between cubes of one SIP
  ``noc_pe``                  NOC <-> a PE's blocks (PE_CPU, PE_DMA, PE_MMU)
  ``dma_sram``                PE_DMA <-> the PE's SRAM
  ``dma_hbm``                 PE_DMA <-> HBM
  ``sip_sip``                 SIP <-> SIP control link between IO_CPUs
  ``sip_data``                SIP <-> SIP data link between the cube-0 NOCs

``[compute]``
  ``pe_clock_hz``             PE core clock in Hz (integer > 0)
  ``pe_flops_per_cycle``      floating-point operations a PE retires per cycle
                              (integer > 0); peak = clock x flops_per_cycle
  ``kernel_launch``           fixed PE_CPU cost of starting one kernel (duration)
  ``host_threads``            host threads numpy/BLAS may use inside one builtin
                              kernel (integer >= 1, default 1); no effect on
                              virtual time, only on how the emulator shares the
                              host's cores

``[processing]`` time a block spends handling one message, before forwarding
or acting on it (durations >= 0):
  ``pcie_ep``, ``io_cpu``, ``m_cpu``, ``noc``, ``pe_cpu``, ``pe_dma`` (the DMA
  engine's issue time per transfer), ``pe_mmu``, ``pe_mmu_entry`` (added per
  map/unmap entry)

``[dma]`` the DMA engine of each PE (every data path of the PE uses it):
  ``outstanding``             transfers in flight at once; more wait in order
  ``translate``               MMU lookup per VA access (without a TLB)
  ``tlb_entries``             pages the engine's TLB holds (0 = no TLB)
  ``tlb_miss``                page walk per page missing from the TLB

Example, a file that only slows the NoC-to-PE hop of the default device::

    name = "slow-noc"
    [links.noc_pe]
    latency = "12ns"

Errors
------
Every problem raises :class:`~kbus.errors.ConfigError` naming the dotted key and
the source, e.g. ``links.noc_pe.latency: '12 parsecs' is not a duration; ...
(in my.toml)``. When a file has several problems, one error lists them all, so
fixing a file takes one round trip rather than one per mistake.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, cast

import attrs
import cattrs
from cattrs.errors import BaseValidationError, ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, override
from rich.markup import escape
from rich.tree import Tree

from kbus.errors import ConfigError
from kbus.sim.units import MS, NS, US, S, parse_bandwidth, parse_size, parse_time

__all__ = [
    "MAX_PES",
    "ComputeConfig",
    "DeviceConfig",
    "DmaConfig",
    "FabricConfig",
    "LinkSpec",
    "Links",
    "MemoryConfig",
    "Processing",
    "Topology",
    "available_presets",
    "describe",
    "tree",
]

MAX_PES: Final = 65536
"""Upper bound on sips x cubes_per_sip x pes_per_cube (PE ids fit 16 bits)."""

_KiB: Final = 1024
_MiB: Final = 1024**2
_GiB: Final = 1024**3
_TiB: Final = 1024**4
_GB: Final = 1000**3
_ADDR_LIMIT: Final = 2**64
_MAX_DURATION: Final = 10**18  # ~11.6 days; keeps every value exactly representable in a Decimal
_MAX_BANDWIDTH: Final = 10**18  # 1 EB/s

# ---------------------------------------------------------------------------
# Field metadata: one description drives parsing, checking, writing and docs.
# ---------------------------------------------------------------------------

Kind = Literal["text", "count", "address", "hertz", "duration", "bandwidth", "size"]

_PARAM: Final = "kbus.param"
_TABLE: Final = "kbus.table"


@attrs.frozen
class _Param:
    """How one scalar key is written, parsed and range-checked.

    Kept as field metadata so the parser, the checker, :func:`describe` and
    :meth:`DeviceConfig.to_toml` cannot disagree about a key.
    """

    kind: Kind
    doc: str
    minimum: int = 0
    maximum: int | None = None
    unit: str = ""  # shown after counts by describe(), e.g. "bytes"
    check: Callable[[int], str | None] | None = None


_DEFAULT_MAX: Final[dict[Kind, int | None]] = {
    "text": None,
    "count": 2**32,
    "address": _ADDR_LIMIT - 1,
    "hertz": 10**12,
    "duration": _MAX_DURATION,
    "bandwidth": _MAX_BANDWIDTH,
    "size": _ADDR_LIMIT,
}


def _param(
    default: Any,
    kind: Kind,
    doc: str,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    unit: str = "",
    check: Callable[[int], str | None] | None = None,
) -> Any:
    """An attrs field for a scalar key (``default`` is in internal units)."""
    spec = _Param(kind, doc, minimum, _DEFAULT_MAX[kind] if maximum is None else maximum, unit, check)
    if default is attrs.NOTHING:
        return attrs.field(metadata={_PARAM: spec})
    return attrs.field(default=default, metadata={_PARAM: spec})


def _doc(doc: str) -> dict[str, str]:
    """Metadata of a field holding a sub-table (another config class): its description."""
    return {_TABLE: doc}


def _fields(cls: type) -> tuple[attrs.Attribute[Any], ...]:
    """``attrs.fields`` for a class known only as ``type`` (the walkers below are generic)."""
    return tuple(attrs.fields(cast("type[attrs.AttrsInstance]", cls)))


def _table_type(f: attrs.Attribute[Any]) -> type:
    """The config class of a sub-table field (types are resolved when the converter is built)."""
    assert isinstance(f.type, type), f"{f.name}: unresolved type {f.type!r}"
    return f.type


def _power_of_two(value: int) -> str | None:
    if value & (value - 1):
        return f"must be a power of two, got {_fmt_size(value)} ({value} bytes)"
    return None


# ---------------------------------------------------------------------------
# The configuration classes.
# ---------------------------------------------------------------------------


@attrs.frozen
class LinkSpec:
    """Latency (ps) and bandwidth (bytes/s) of one hop of the fabric."""

    latency: int = _param(attrs.NOTHING, "duration", "fixed delay of one hop")
    bandwidth: int = _param(attrs.NOTHING, "bandwidth", "serialization rate of one hop", minimum=1)

    def serialization(self, nbytes: int) -> int:
        """Picoseconds ``nbytes`` occupy this link, rounded up (as :class:`kbus.sim.Link` does)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return -(-nbytes * S // self.bandwidth)


@attrs.frozen
class Topology:
    """How many SIPs, cubes and PEs the device has."""

    sips: int = _param(2, "count", "SIP chips on the board", minimum=1, maximum=MAX_PES)
    cubes_per_sip: int = _param(4, "count", "cubes in each SIP", minimum=1, maximum=MAX_PES)
    pes_per_cube: int = _param(8, "count", "processing elements (PEs) in each cube", minimum=1, maximum=MAX_PES)
    cube_network: str = _param("ring", "text", "how the cubes of a SIP connect: ring, mesh2d or torus2d")
    cube_cols: int = _param(
        2, "count", "columns of the mesh2d/torus2d grid of cubes (rows = cubes_per_sip / cube_cols)", minimum=1
    )
    sip_network: str = _param("full", "text", "how the SIPs connect for data: full (mesh) or ring")

    @property
    def num_cubes(self) -> int:
        """Cubes on the whole device."""
        return self.sips * self.cubes_per_sip

    @property
    def num_pes(self) -> int:
        """PEs on the whole device."""
        return self.sips * self.cubes_per_sip * self.pes_per_cube


@attrs.frozen
class MemoryConfig:
    """Per-PE memories and the address spaces laid over them."""

    sram_per_pe: int = _param(4 * _MiB, "size", "SRAM of each PE, at physical addresses [0, sram_per_pe)", minimum=1)
    hbm_per_pe: int = _param(1 * _GiB, "size", "HBM slice owned by each PE", minimum=1)
    hbm_base: int = _param(
        0x10_0000_0000, "address", "physical address where the HBM slice starts (>= sram_per_pe, page aligned)"
    )
    page_size: int = _param(
        64 * _KiB,
        "size",
        "MMU page size (a power of two >= 4KiB)",
        minimum=4 * _KiB,
        maximum=2**40,
        check=_power_of_two,
    )
    va_base: int = _param(0x1000_0000_0000, "address", "first device virtual address handed to tensors")
    va_size: int = _param(1 * _TiB, "size", "size of the device virtual address range (a page multiple)", minimum=1)
    hbm_scope: str = _param("cube", "text", "who shares one HBM: each cube has its own (cube) or one per SIP (sip)")
    hbm_channels: int = _param(8, "count", "channels of one HBM (addresses interleaved over all)", minimum=1)
    hbm_channel_bandwidth: int = _param(100 * _GB, "bandwidth", "bandwidth of one HBM channel", minimum=1)
    hbm_latency: int = _param(30 * NS, "duration", "access latency of HBM")
    sram_bandwidth: int = _param(512 * _GB, "bandwidth", "bandwidth of one PE's SRAM", minimum=1)
    sram_latency: int = _param(1 * NS, "duration", "access latency of SRAM")


@attrs.frozen
class FabricConfig:
    """Queueing parameters shared by every block and link."""

    inbox_capacity: int = _param(
        64, "count", "messages a block's inbox holds before senders block", minimum=1, unit="messages"
    )
    msg_bytes: int = _param(64, "count", "bytes one message descriptor occupies on a link", minimum=1, unit="bytes")
    map_entry_bytes: int = _param(
        32, "count", "bytes each MmuMap/MmuUnmap entry adds to its message on a link", unit="bytes"
    )
    model: str = _param("flow", "text", "how transfers share links: flow (max-min fair) or packet (reference)")
    packet_bytes: int = _param(256, "size", "packet size of the packet model", minimum=1)


@attrs.frozen
class Links:
    """One :class:`LinkSpec` per level of the fabric, host outward to memory."""

    host_pcie: LinkSpec = attrs.field(
        default=LinkSpec(500 * NS, 32 * _GB), metadata=_doc("host <-> PCIE_EP (the PCIe bus)")
    )
    pcie_io: LinkSpec = attrs.field(
        default=LinkSpec(50 * NS, 64 * _GB), metadata=_doc("PCIE_EP <-> IO_CPU inside a SIP")
    )
    io_mcpu: LinkSpec = attrs.field(default=LinkSpec(20 * NS, 128 * _GB), metadata=_doc("IO_CPU <-> each cube's M_CPU"))
    mcpu_noc: LinkSpec = attrs.field(
        default=LinkSpec(10 * NS, 256 * _GB), metadata=_doc("M_CPU <-> the cube's NOC router")
    )
    noc_hop: LinkSpec = attrs.field(
        default=LinkSpec(15 * NS, 256 * _GB), metadata=_doc("NOC <-> NOC between cubes of one SIP")
    )
    noc_pe: LinkSpec = attrs.field(
        default=LinkSpec(5 * NS, 256 * _GB), metadata=_doc("NOC <-> a PE's blocks (PE_CPU, PE_DMA, PE_MMU)")
    )
    dma_sram: LinkSpec = attrs.field(default=LinkSpec(2 * NS, 512 * _GB), metadata=_doc("PE_DMA <-> the PE's SRAM"))
    dma_hbm: LinkSpec = attrs.field(default=LinkSpec(40 * NS, 256 * _GB), metadata=_doc("PE_DMA <-> HBM"))
    sip_sip: LinkSpec = attrs.field(
        default=LinkSpec(300 * NS, 100 * _GB), metadata=_doc("SIP <-> SIP control link between IO_CPUs")
    )
    sip_data: LinkSpec = attrs.field(
        default=LinkSpec(300 * NS, 100 * _GB), metadata=_doc("SIP <-> SIP data link between the cube-0 NOCs")
    )

    def items(self) -> Iterator[tuple[str, LinkSpec]]:
        """``(level, spec)`` pairs in declaration order (host outward)."""
        for f in attrs.fields(Links):
            yield f.name, getattr(self, f.name)


@attrs.frozen
class ComputeConfig:
    """How fast a PE computes, and what starting a kernel costs."""

    pe_clock_hz: int = _param(1_500_000_000, "hertz", "PE core clock", minimum=1)
    pe_flops_per_cycle: int = _param(
        512, "count", "floating-point operations a PE retires per cycle", minimum=1, unit="FLOP/cycle"
    )
    kernel_launch: int = _param(200 * NS, "duration", "fixed PE_CPU cost of starting one kernel")
    host_threads: int = _param(
        1,
        "count",
        "host threads numpy/BLAS may use inside one builtin kernel (simulated PEs share the host's cores)",
        minimum=1,
        maximum=1024,
    )

    @property
    def pe_flops(self) -> int:
        """Peak FLOP/s of one PE."""
        return self.pe_clock_hz * self.pe_flops_per_cycle

    def cycles_to_ps(self, cycles: int) -> int:
        """Duration of ``cycles`` PE clock cycles in ps, rounded up.

        Rounding up keeps any non-zero amount of work from taking zero time.
        """
        if cycles < 0:
            raise ValueError(f"cycles must be >= 0, got {cycles}")
        return -(-cycles * S // self.pe_clock_hz)

    def flops_to_ps(self, flops: int) -> int:
        """Time one PE needs for ``flops`` operations at peak, in ps (whole cycles, rounded up)."""
        if flops < 0:
            raise ValueError(f"flops must be >= 0, got {flops}")
        return self.cycles_to_ps(-(-flops // self.pe_flops_per_cycle))


@attrs.frozen
class Processing:
    """Time each kind of block spends handling one message."""

    pcie_ep: int = _param(20 * NS, "duration", "PCIE_EP handling time per message")
    io_cpu: int = _param(50 * NS, "duration", "IO_CPU handling time per message")
    m_cpu: int = _param(30 * NS, "duration", "M_CPU handling time per message")
    noc: int = _param(5 * NS, "duration", "NOC routing time per message")
    pe_cpu: int = _param(20 * NS, "duration", "PE_CPU handling time per message")
    pe_dma: int = _param(10 * NS, "duration", "PE_DMA handling time per command")
    pe_mmu: int = _param(5 * NS, "duration", "PE_MMU handling time per map/unmap message")
    pe_mmu_entry: int = _param(1 * NS, "duration", "PE_MMU handling time per map/unmap entry")


@attrs.frozen
class DmaConfig:
    """The DMA engine of each PE, used by every transfer the PE makes."""

    outstanding: int = _param(16, "count", "transfers one DMA engine keeps in flight at once", minimum=1)
    translate: int = _param(2 * NS, "duration", "MMU lookup per VA access (without a TLB)")
    tlb_entries: int = _param(0, "count", "pages the DMA engine's TLB holds (0 = no TLB)")
    tlb_miss: int = _param(50 * NS, "duration", "page walk on a TLB miss (per missing page)")


@attrs.frozen
class DeviceConfig:
    """The whole device: topology, memory, fabric, links, compute, processing.

    Immutable and validated on construction (direct, via :func:`attrs.evolve` or
    via a loader), so a ``DeviceConfig`` in hand is always consistent. Load one
    with :meth:`load`, :meth:`preset`, :meth:`from_toml` or :meth:`from_dict`;
    derive variants with :meth:`replace`.
    """

    name: str = _param("default", "text", "free text naming the configuration")
    topology: Topology = attrs.field(factory=Topology, metadata=_doc("how many SIPs, cubes and PEs"))
    memory: MemoryConfig = attrs.field(factory=MemoryConfig, metadata=_doc("per-PE memories and address spaces"))
    fabric: FabricConfig = attrs.field(factory=FabricConfig, metadata=_doc("inbox depth and message descriptor size"))
    links: Links = attrs.field(factory=Links, metadata=_doc("latency and bandwidth of each fabric level"))
    compute: ComputeConfig = attrs.field(
        factory=ComputeConfig, metadata=_doc("PE compute speed and kernel launch cost")
    )
    dma: DmaConfig = attrs.field(factory=DmaConfig, metadata=_doc("the DMA engine of each PE"))
    processing: Processing = attrs.field(
        factory=Processing, metadata=_doc("per-message handling time of each block type")
    )

    def __attrs_post_init__(self) -> None:
        # Checked here rather than per class because some rules span tables
        # (hbm_base vs sram_per_pe); loaders re-raise with the source named.
        problems = _tree_problems(self)
        if problems:
            raise _InvalidConfig(problems)

    # -- loading -----------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> DeviceConfig:
        """A shipped preset by name (see :func:`available_presets`)."""
        return _load_preset(name)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], *, base: DeviceConfig | None = None) -> DeviceConfig:
        """Load a TOML file; keys it omits come from ``base`` (the ``default`` preset).

        A file without ``name`` is named after its stem, so a partial file is
        never mistaken for the preset it modifies.
        """
        source = os.fspath(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"cannot read device config: {reason} (in {source})", source=source) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"file is not UTF-8 text: {exc} (in {source})", source=source) from None
        data = _parse_toml(text, source)
        if "name" not in data:
            data["name"] = Path(path).stem
        return cls.from_dict(data, source=source, base=base)

    @classmethod
    def from_toml_text(cls, text: str, source: str = "<string>", *, base: DeviceConfig | None = None) -> DeviceConfig:
        """Load TOML text; ``source`` names it in error messages."""
        return cls.from_dict(_parse_toml(text, source), source=source, base=base)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "<dict>", *, base: DeviceConfig | None = None
    ) -> DeviceConfig:
        """Build from TOML-shaped data (human unit strings), overlaid on ``base``.

        ``base`` defaults to the built-in defaults (equal to the ``default``
        preset). Raises one :class:`ConfigError` listing every problem.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table of settings, got {_show(data)} (in {source})", source=source)
        merged = _deep_merge((base if base is not None else _builtin_default()).to_dict(), data)
        try:
            return _CONVERTER.structure(merged, DeviceConfig)
        except (BaseValidationError, ValueError, TypeError) as exc:
            problems: list[tuple[str, str]] = []
            _collect(exc, (), problems)
            raise _config_error(problems, source) from None

    @classmethod
    def load(cls, spec: DeviceConfig | str | os.PathLike[str] | None = None) -> DeviceConfig:
        """Resolve whatever a user passed: a config, a preset name, a TOML path, or None (``default``).

        A string is a file if it ends in ``.toml`` or contains a path separator,
        a preset if it names one, and otherwise a file if one exists.
        """
        if spec is None:
            return cls.preset("default")
        if isinstance(spec, DeviceConfig):
            return spec
        if isinstance(spec, os.PathLike):
            return cls.from_toml(spec)
        if not isinstance(spec, str):
            raise TypeError(f"expected a DeviceConfig, preset name or TOML path, got {type(spec).__name__}")
        looks_like_path = spec.endswith(".toml") or os.sep in spec or (os.altsep is not None and os.altsep in spec)
        if looks_like_path:
            return cls.from_toml(spec)
        if spec in available_presets():
            return cls.preset(spec)
        if os.path.isfile(spec):
            return cls.from_toml(spec)
        raise ConfigError(
            f"{spec!r} is neither a preset nor a TOML file; presets: {', '.join(available_presets())}",
            source=spec,
        )

    # -- writing -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """TOML-shaped data in human units; :meth:`from_dict` reads it back unchanged."""
        return _to_dict(self)

    def to_toml(self) -> str:
        """TOML text in human units (``"12ns"``, ``"64GB/s"``, ``"4MiB"``), with comments.

        Values are written exactly (``"1.234567us"`` rather than a rounded
        figure), so ``from_toml_text(cfg.to_toml()) == cfg`` always holds.
        """
        lines = [
            f"# kbus device configuration {self.name!r}.",
            "# Durations: ps ns us ms s. Bandwidths: B/s KB/s MB/s GB/s TB/s (powers of 1000).",
            "# Sizes: B KiB MiB GiB TiB (powers of 1024) or KB MB GB TB (powers of 1000).",
        ]
        _emit_table(DeviceConfig, self.to_dict(), (), "", lines)
        return "\n".join(lines) + "\n"

    # -- deriving ----------------------------------------------------------

    def replace(self, key: str, value: object) -> DeviceConfig:
        """A copy with one dotted key changed: ``cfg.replace("links.noc_pe.latency", "7ns")``.

        ``value`` is written as in TOML (``"7ns"``); an int for a duration or
        bandwidth is taken in internal units (ps, bytes/s), and a table key
        accepts a dict or a config object, merged over the current values.
        """
        return self.with_overrides({key: value}, source="<replace>")

    def with_overrides(self, overrides: Mapping[str, object], source: str = "<overrides>") -> DeviceConfig:
        """A copy with several dotted keys changed at once (see :meth:`replace`).

        Handy for command lines (``--set links.noc_pe.latency=7ns``); every bad
        key or value is reported in one :class:`ConfigError`.
        """
        data: dict[str, Any] = {}
        for key, value in overrides.items():
            parts = key.split(".")
            if not key or any(not p for p in parts):
                raise ConfigError(
                    f"{key!r} is not a dotted key such as 'links.noc_pe.latency' (in {source})", key=key, source=source
                )
            node = data
            for part in parts[:-1]:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            converted = _external(_param_for_key(parts), value)
            if isinstance(node.get(parts[-1]), dict) and isinstance(converted, dict):
                converted = _deep_merge(node[parts[-1]], converted)
            node[parts[-1]] = converted
        return DeviceConfig.from_dict(data, source=source, base=self)

    # -- topology helpers used by the device layer --------------------------

    @property
    def num_sips(self) -> int:
        """SIPs on the device."""
        return self.topology.sips

    @property
    def num_cubes(self) -> int:
        """Cubes on the whole device."""
        return self.topology.num_cubes

    @property
    def num_pes(self) -> int:
        """PEs on the whole device."""
        return self.topology.num_pes

    def pe_coords(self) -> Iterator[tuple[int, int, int]]:
        """Every ``(sip, cube, pe)`` in path order."""
        t = self.topology
        for sip in range(t.sips):
            for cube in range(t.cubes_per_sip):
                for pe in range(t.pes_per_cube):
                    yield sip, cube, pe

    def check_coords(self, sip: int, cube: int | None = None, pe: int | None = None) -> None:
        """Raise ``ValueError`` naming the coordinate that is out of range and the valid range.

        ``cube`` and ``pe`` may be omitted to check a SIP or a cube only.
        """
        t = self.topology
        for what, value, count, key in (
            ("sip", sip, t.sips, "topology.sips"),
            ("cube", cube, t.cubes_per_sip, "topology.cubes_per_sip"),
            ("pe", pe, t.pes_per_cube, "topology.pes_per_cube"),
        ):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{what} index must be an int, got {type(value).__name__} {value!r}")
            if not 0 <= value < count:
                raise ValueError(
                    f"{what} {value} is out of range: valid {what} indices are 0..{count - 1} "
                    f"({key} = {count} in config {self.name!r})"
                )

    def sip_path(self, sip: int) -> str:
        """``"sip0"``, after checking the index."""
        self.check_coords(sip)
        return f"sip{sip}"

    def cube_path(self, sip: int, cube: int) -> str:
        """``"sip0.cube1"``, after checking the indices."""
        self.check_coords(sip, cube)
        return f"sip{sip}.cube{cube}"

    def pe_path(self, sip: int, cube: int, pe: int) -> str:
        """``"sip0.cube1.pe3"``, after checking the indices."""
        self.check_coords(sip, cube, pe)
        return f"sip{sip}.cube{cube}.pe{pe}"


class _InvalidConfig(ConfigError):
    """Raised by :class:`DeviceConfig` construction; carries the problems so loaders can add the source."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(_format_problems(problems, ""), key=problems[0][0])
        self.problems = problems


# ---------------------------------------------------------------------------
# Formatting values in human units, exactly (so that writing then reading is lossless).
# ---------------------------------------------------------------------------


def _exact_decimal(value: int, units: tuple[tuple[str, int], ...], base: str) -> str:
    """``value`` in the largest power-of-ten unit not exceeding it, with every digit kept."""
    for name, unit in units:
        if value >= unit:
            whole, rest = divmod(value, unit)
            if rest == 0:
                return f"{whole}{name}"
            frac = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
            return f"{whole}.{frac}{name}"
    return f"{value}{base}"


def _fmt_time(t: int) -> str:
    if t == 0:
        return "0ns"
    return _exact_decimal(t, (("s", S), ("ms", MS), ("us", US), ("ns", NS)), "ps")


def _fmt_bandwidth(bps: int) -> str:
    return _exact_decimal(bps, (("TB/s", 1000**4), ("GB/s", 1000**3), ("MB/s", 1000**2), ("KB/s", 1000)), "B/s")


def _fmt_hz(hz: int) -> str:
    return _exact_decimal(hz, (("GHz", 10**9), ("MHz", 10**6), ("kHz", 10**3)), "Hz")


def _fmt_size(n: int) -> str:
    """Whole multiples only: ``"1536KiB"`` rather than ``"1.5MiB"``, so the text is exact."""
    for units in (
        (("TiB", _TiB), ("GiB", _GiB), ("MiB", _MiB), ("KiB", _KiB)),
        (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)),
    ):
        for name, unit in units:
            if n >= unit and n % unit == 0:
                return f"{n // unit}{name}"
    return f"{n}B"


def _fmt_address(a: int) -> str:
    return f"0x{a:_x}"


def _display(spec: _Param, value: Any) -> str:
    """A value as a person should read it (describe(), error messages)."""
    if spec.kind == "text":
        return str(value)
    if spec.kind == "duration":
        return _fmt_time(value)
    if spec.kind == "bandwidth":
        return _fmt_bandwidth(value)
    if spec.kind == "size":
        return _fmt_size(value)
    if spec.kind == "address":
        return _fmt_address(value)
    if spec.kind == "hertz":
        return _fmt_hz(value)
    return f"{value} {spec.unit}" if spec.unit else str(value)


def _show(raw: object) -> str:
    """What a wrong value is, in TOML words, for error messages."""
    if isinstance(raw, bool):
        return f"the boolean {'true' if raw else 'false'}"
    if isinstance(raw, str):
        return f"the string {raw!r}"
    if isinstance(raw, int):
        return f"the integer {raw}"
    if isinstance(raw, float):
        return f"the float {raw!r}"
    if isinstance(raw, Mapping):
        return "a table"
    if isinstance(raw, list | tuple):
        return "an array"
    return f"a {type(raw).__name__}"


# ---------------------------------------------------------------------------
# Parsing and checking one scalar.
# ---------------------------------------------------------------------------

_INT_RE = re.compile(r"^\s*[+-]?(0x[0-9a-fA-F_]+|[0-9_]+)\s*$")
_HZ_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(GHz|MHz|kHz|Hz)\s*$")
_HZ_UNITS = {"GHz": 10**9, "MHz": 10**6, "kHz": 10**3, "Hz": 1}


def _parse_hz(raw: str) -> int:
    """``"1.5GHz"`` -> 1_500_000_000; a whole number of hertz, as the config keeps them."""
    m = _HZ_RE.match(raw)
    if m is None:
        raise ValueError(f"{raw!r} is not a frequency; write a number and a unit (Hz, kHz, MHz, GHz), e.g. '1.5GHz'")
    hz = Decimal(m.group(1)) * _HZ_UNITS[m.group(2)]
    if hz != hz.to_integral_value():
        raise ValueError(f"{raw!r} is not a whole number of hertz")
    return int(hz)


def _parse(spec: _Param, raw: Any) -> Any:
    """TOML value -> internal value; ``TypeError``/``ValueError`` carry the message without the key."""
    kind = spec.kind
    if kind == "text":
        if not isinstance(raw, str):
            raise TypeError(f"expected a string, got {_show(raw)}")
        return raw
    if kind == "hertz" and isinstance(raw, str):
        return _parse_hz(raw)  # what `kbus info` shows ("1.5GHz") reads back
    if kind in ("count", "address", "hertz"):
        if isinstance(raw, bool) or not isinstance(raw, int):
            hint = f"; write it without quotes: {raw.strip()}" if isinstance(raw, str) and _INT_RE.match(raw) else ""
            raise TypeError(f"expected an integer, got {_show(raw)}{hint}")
        return raw
    if kind == "size":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw  # bytes; the range check reports negatives
        if not isinstance(raw, str):
            raise TypeError(f"expected a size such as '64KiB' (or an integer number of bytes), got {_show(raw)}")
        try:
            return parse_size(raw)
        except ValueError:
            raise ValueError(
                f"{raw!r} is not a size; write a number and a unit (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), "
                "e.g. '64KiB'"
            ) from None
    if kind == "duration":
        if not isinstance(raw, str):
            hint = " (a bare number has no unit)" if isinstance(raw, int | float) and not isinstance(raw, bool) else ""
            raise TypeError(f"expected a duration string such as '12ns', got {_show(raw)}{hint}")
        try:
            return parse_time(raw)
        except ValueError:
            raise ValueError(
                f"{raw!r} is not a duration; write a number and a unit (ps, ns, us, ms, s), e.g. '12ns'"
            ) from None
    # bandwidth
    if not isinstance(raw, str):
        hint = " (a bare number has no unit)" if isinstance(raw, int | float) and not isinstance(raw, bool) else ""
        raise TypeError(f"expected a bandwidth string such as '64GB/s', got {_show(raw)}{hint}")
    try:
        return parse_bandwidth(raw)
    except ValueError as exc:
        if str(exc).endswith("must be > 0"):
            raise ValueError(f"{raw!r}: a bandwidth must be > 0, e.g. '64GB/s'") from None
        raise ValueError(
            f"{raw!r} is not a bandwidth; write a number and a unit (B/s, KB/s, MB/s, GB/s, TB/s, or KiB/s...), "
            "e.g. '64GB/s'"
        ) from None


def _check(spec: _Param, value: Any) -> str | None:
    """Problem with an internal value (type and range), or None."""
    if spec.kind == "text":
        if not isinstance(value, str):
            return f"expected a string, got {_show(value)}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{value!r} contains characters that cannot be written as UTF-8"
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer ({spec.kind} in internal units), got {_show(value)}"
    show = str if spec.kind == "count" else (lambda v: _display(spec, v) if v >= 0 else str(v))
    if value < spec.minimum:
        return f"must be >= {show(spec.minimum)}, got {show(value)}"
    if spec.maximum is not None and value > spec.maximum:
        return f"must be <= {show(spec.maximum)}, got {show(value)}"
    return spec.check(value) if spec.check is not None else None


def _cross_problems(cfg: DeviceConfig) -> list[tuple[str, str]]:
    """Constraints between keys; only meaningful once every key is valid on its own."""
    out: list[tuple[str, str]] = []
    t, m = cfg.topology, cfg.memory
    if t.num_pes > MAX_PES:
        out.append(
            (
                "topology",
                f"{t.sips} SIPs x {t.cubes_per_sip} cubes x {t.pes_per_cube} PEs = {t.num_pes} PEs; "
                f"at most {MAX_PES} PEs are supported",
            )
        )
    choices = (
        ("topology.cube_network", t.cube_network, ("ring", "mesh2d", "torus2d")),
        ("topology.sip_network", t.sip_network, ("full", "ring")),
        ("memory.hbm_scope", m.hbm_scope, ("cube", "sip")),
        ("fabric.model", cfg.fabric.model, ("flow", "packet")),
    )
    for key, value, allowed in choices:
        if value not in allowed:
            out.append((key, f"{value!r} is not one of {', '.join(allowed)}"))
    if t.cube_network in ("mesh2d", "torus2d") and t.cubes_per_sip % t.cube_cols:
        out.append(
            (
                "topology.cube_cols",
                f"{t.cube_cols} columns do not divide {t.cubes_per_sip} cubes into a {t.cube_network} grid",
            )
        )
    page = _fmt_size(m.page_size)
    if m.hbm_base < m.sram_per_pe:
        out.append(
            (
                "memory.hbm_base",
                f"{_fmt_address(m.hbm_base)} overlaps SRAM: it must be >= sram_per_pe ({_fmt_size(m.sram_per_pe)}), "
                "because SRAM occupies physical addresses [0, sram_per_pe)",
            )
        )
    if m.hbm_base % m.page_size:
        out.append(("memory.hbm_base", f"{_fmt_address(m.hbm_base)} is not aligned to page_size ({page})"))
    if m.hbm_base + m.hbm_per_pe > _ADDR_LIMIT:
        out.append(("memory.hbm_per_pe", "hbm_base + hbm_per_pe runs past the 64-bit physical address space"))
    if m.va_base % m.page_size:
        out.append(("memory.va_base", f"{_fmt_address(m.va_base)} is not aligned to page_size ({page})"))
    if m.va_size % m.page_size:
        out.append(("memory.va_size", f"{_fmt_size(m.va_size)} is not a multiple of page_size ({page})"))
    if m.va_base + m.va_size > _ADDR_LIMIT:
        out.append(("memory.va_size", "va_base + va_size runs past the 64-bit virtual address space"))
    return out


def _field_problems(obj: object, prefix: str, out: list[tuple[str, str]]) -> None:
    for f in _fields(type(obj)):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        spec = f.metadata.get(_PARAM)
        if spec is not None:
            problem = _check(spec, value)
            if problem is not None:
                out.append((key, problem))
        elif not isinstance(value, _table_type(f)):
            out.append((key, f"expected a {_table_type(f).__name__} table, got {_show(value)}"))
        else:
            _field_problems(value, key + ".", out)


def _tree_problems(cfg: DeviceConfig) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    _field_problems(cfg, "", out)
    return out or _cross_problems(cfg)


# ---------------------------------------------------------------------------
# The cattrs converter: structure hooks per field, built from the metadata.
# ---------------------------------------------------------------------------

# Nested classes first: a parent's structure function resolves its children's hooks when generated.
_CONFIG_CLASSES: Final = (
    LinkSpec,
    Topology,
    MemoryConfig,
    FabricConfig,
    Links,
    ComputeConfig,
    DmaConfig,
    Processing,
    DeviceConfig,
)


def _leaf_hook(spec: _Param) -> Callable[[Any, Any], Any]:
    def hook(raw: Any, _type: Any) -> Any:
        value = _parse(spec, raw)
        problem = _check(spec, value)
        if problem is not None:
            raise ValueError(problem)
        return value

    return hook


def _make_converter() -> cattrs.Converter:
    """A converter private to this module: strict keys, every error collected.

    Dedicated so that hooks registered here (units, strict ints) never leak
    into the protocol converter, where an int is just an int.
    """
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for cls in _CONFIG_CLASSES:
        attrs.resolve_types(cls)
        overrides = {
            f.name: override(struct_hook=_leaf_hook(f.metadata[_PARAM]))
            for f in attrs.fields(cls)
            if _PARAM in f.metadata
        }
        inner = make_dict_structure_fn(cls, conv, **overrides)  # type: ignore[arg-type]

        def hook(value: Any, _type: Any, inner: Callable[[Any, Any], Any] = inner, cls: type = cls) -> Any:
            if not isinstance(value, Mapping):
                raise TypeError(f"expected a table, got {_show(value)}")
            return inner(value, cls)

        conv.register_structure_hook(cls, hook)
    return conv


def _collect(exc: BaseException, path: tuple[str, ...], out: list[tuple[str, str]]) -> None:
    """Flatten cattrs' exception groups into ``(dotted key, message)`` pairs."""
    key = ".".join(path)
    if isinstance(exc, ClassValidationError):
        with_notes, others = exc.group_exceptions()
        for sub, note in with_notes:
            _collect(sub, (*path, note.name), out)
        for sub in others:
            _collect(sub, path, out)
    elif isinstance(exc, ForbiddenExtraKeysError):
        valid = [f.name for f in attrs.fields(exc.cl)]
        where = f"[{key}]" if key else "the top level"
        for extra in sorted(exc.extra_fields, key=str):
            close = difflib.get_close_matches(str(extra), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(
                (
                    ".".join((*path, str(extra))),
                    f"unknown key{hint}; valid keys in {where}: {', '.join(valid)}",
                )
            )
    elif isinstance(exc, _InvalidConfig):
        out.extend((f"{key}.{k}" if key else k, msg) for k, msg in exc.problems)
    elif isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            _collect(member, path, out)
    else:
        out.append((key, str(exc)))


def _format_problems(problems: list[tuple[str, str]], source: str) -> str:
    where = f" (in {source})" if source else ""
    lines = [f"{key or 'config'}: {msg}" for key, msg in problems]
    if len(lines) == 1:
        return lines[0] + where
    return f"{len(lines)} problems{where}:\n" + "\n".join(f"  {line}" for line in lines)


def _config_error(problems: list[tuple[str, str]], source: str) -> ConfigError:
    if not problems:  # defensive: cattrs raised something without detail
        problems = [("", "invalid configuration")]
    return ConfigError(_format_problems(problems, source), key=problems[0][0], source=source)


_CONVERTER: Final = _make_converter()


# ---------------------------------------------------------------------------
# Dicts and TOML text.
# ---------------------------------------------------------------------------


def _to_external(spec: _Param, value: Any) -> Any:
    """The TOML value: unit strings for durations, bandwidths and sizes; everything else as is."""
    return _display(spec, value) if spec.kind in ("duration", "bandwidth", "size") else value


def _to_dict(obj: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in _fields(type(obj)):
        value = getattr(obj, f.name)
        spec = f.metadata.get(_PARAM)
        out[f.name] = _to_external(spec, value) if spec is not None else _to_dict(value)
    return out


def _external(spec: _Param | None, value: object) -> object:
    """A replace() value in TOML form: config objects become dicts, internal ints become unit strings."""
    if attrs.has(type(value)) and type(value) in _CONFIG_CLASSES:
        return _to_dict(value)
    if (
        spec is not None
        and spec.kind in ("duration", "bandwidth")
        and isinstance(value, int)
        and not isinstance(value, bool)
        and value >= (1 if spec.kind == "bandwidth" else 0)
    ):
        return _to_external(spec, value)
    return value


def _param_for_key(parts: list[str]) -> _Param | None:
    cls: type = DeviceConfig
    spec: _Param | None = None
    for part in parts:
        if spec is not None or not attrs.has(cls):
            return None
        field = getattr(attrs.fields(cls), part, None)
        if field is None:
            return None
        spec = field.metadata.get(_PARAM)
        cls = field.type
    return spec


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML: {exc} (in {source})", source=source) from None


_TOML_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_scalar(spec: _Param, value: Any) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if spec.kind == "address":
        return _fmt_address(value)
    return f"{value:_}" if value >= 10_000 else str(value)


def _emit_table(cls: type, data: Mapping[str, Any], path: tuple[str, ...], doc: str, lines: list[str]) -> None:
    fields = _fields(cls)
    scalars = [f for f in fields if _PARAM in f.metadata]
    if path:
        lines.append("")
        if doc:
            lines.append(f"# {doc}")
        if scalars:
            lines.append(f"[{'.'.join(path)}]")
    assignments = [
        (f"{f.name} = {_toml_scalar(f.metadata[_PARAM], data[f.name])}", f.metadata[_PARAM]) for f in scalars
    ]
    width = max((len(a) for a, _ in assignments), default=0)
    for text, spec in assignments:
        lines.append(f"{text.ljust(width)}  # {spec.doc}")
    for f in fields:
        if _TABLE in f.metadata:
            _emit_table(_table_type(f), data[f.name], (*path, f.name), f.metadata[_TABLE], lines)


# ---------------------------------------------------------------------------
# Presets.
# ---------------------------------------------------------------------------

_PRESET_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _presets_dir() -> Any:
    return resources.files("kbus.hw") / "presets"


@cache
def available_presets() -> tuple[str, ...]:
    """Names of the presets shipped in ``kbus/hw/presets/``, sorted."""
    return tuple(sorted(p.name.removesuffix(".toml") for p in _presets_dir().iterdir() if p.name.endswith(".toml")))


@cache
def _load_preset(name: str) -> DeviceConfig:
    # Cached: configs are immutable, and simulations create devices often.
    if not isinstance(name, str) or not _PRESET_NAME_RE.match(name) or name not in available_presets():
        raise ConfigError(
            f"unknown preset {name!r}; available presets: {', '.join(available_presets())}",
            source=f"<preset {name}>",
        )
    text = (_presets_dir() / f"{name}.toml").read_text(encoding="utf-8")
    return DeviceConfig.from_toml_text(text, source=f"<preset {name}>")


@cache
def _builtin_default() -> DeviceConfig:
    return DeviceConfig()


# ---------------------------------------------------------------------------
# Presentation for `kbus info`.
# ---------------------------------------------------------------------------


def _rows(obj: object, prefix: str, context: str, out: list[tuple[str, str, str]]) -> None:
    for f in _fields(type(obj)):
        value = getattr(obj, f.name)
        spec = f.metadata.get(_PARAM)
        if spec is not None:
            meaning = f"{context}: {spec.doc}" if context else spec.doc
            out.append((f"{prefix}{f.name}", _display(spec, value), meaning))
        else:
            sub_context = f.metadata[_TABLE] if type(obj) is Links else ""
            _rows(value, f"{prefix}{f.name}.", sub_context, out)


def describe(cfg: DeviceConfig) -> list[tuple[str, str, str]]:
    """``(dotted key, value with unit, meaning)`` for every parameter, in file order."""
    out: list[tuple[str, str, str]] = []
    _rows(cfg, "", "", out)
    return out


def _shown(count: int, max_items: int) -> tuple[range, int]:
    """Indices to draw and how many are left out: long lists show their first two."""
    if count <= max_items:
        return range(count), 0
    head = min(2, max_items)
    return range(head), count - head


def tree(cfg: DeviceConfig, *, max_items: int = 4) -> Tree:
    """The device as a rich tree: SIP > cube > PE, with each block named.

    A list longer than ``max_items`` (SIPs, cubes or PEs) shows its first two
    entries and a "... N more" line, so ``large`` stays readable.
    """
    t, m, links = cfg.topology, cfg.memory, cfg.links
    root = Tree(
        f"[bold]{escape(cfg.name)}[/]: {t.sips} SIP x {t.cubes_per_sip} cubes x {t.pes_per_cube} PEs = {t.num_pes} PEs"
    )
    root.add(f"host link: {_fmt_time(links.host_pcie.latency)}, {_fmt_bandwidth(links.host_pcie.bandwidth)}")
    sips, more_sips = _shown(t.sips, max_items)
    for sip in sips:
        sip_node = root.add(f"[bold]sip{sip}[/]")
        sip_node.add("pcie_ep")
        sip_node.add("io_cpu")
        cubes, more_cubes = _shown(t.cubes_per_sip, max_items)
        for cube in cubes:
            cube_node = sip_node.add(f"[bold]cube{cube}[/] [dim]sip{sip}.cube{cube}[/]")
            cube_node.add("m_cpu")
            cube_node.add("noc")
            cube_node.add(f"hbm [dim]{_fmt_size(m.hbm_per_pe)} per PE at {_fmt_address(m.hbm_base)}[/]")
            pes, more_pes = _shown(t.pes_per_cube, max_items)
            for pe in pes:
                pe_node = cube_node.add(f"[bold]pe{pe}[/] [dim]sip{sip}.cube{cube}.pe{pe}[/]")
                for block in ("cpu", "dma", "mmu"):
                    pe_node.add(block)
                pe_node.add(f"sram [dim]{_fmt_size(m.sram_per_pe)}[/]")
            if more_pes:
                cube_node.add(f"[dim]... {more_pes} more PE{'s' if more_pes > 1 else ''}[/]")
        if more_cubes:
            sip_node.add(f"[dim]... {more_cubes} more cube{'s' if more_cubes > 1 else ''}[/]")
    if more_sips:
        root.add(f"[dim]... {more_sips} more SIP{'s' if more_sips > 1 else ''}[/]")
    return root
