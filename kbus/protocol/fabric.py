"""Fabric-internal messages: what blocks inside the device say to each other.

These never cross the host<->device boundary, but they are serializable through
the same codec (with their own ``msg_type`` tags) so that traces, recordings and
the debug "wire" inbox mode can carry them. Like the host messages they are
frozen, slotted and unchecked at construction.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import attrs

from .messages import KernelLaunchMsg, MemoryReadMsg, MemoryWriteMsg, MmuMapMsg, MmuUnmapMsg, PeDmaMsg


@attrs.frozen
class DmaCommand:
    """Tell the memory of PE (sip, cube, pe) to act on ``nbytes`` at physical address ``addr``.

    ``op`` selects the transfer:

    - ``"read"``: memory at ``addr`` -> host buffer ``host_buffer`` at ``host_offset``
      (or to the issuing DMA engine when ``host_buffer`` is None);
    - ``"write"``: host buffer ``host_buffer`` at ``host_offset`` (or the issuing
      engine's data) -> memory at ``addr``;
    - ``"fill"``: the named ``pattern`` -> memory at ``addr``;
    - ``"copy"``: memory at ``src_addr`` -> memory at ``addr`` (same PE).

    The address fields are named ``addr``/``src_addr`` as in the seed (which
    renamed ``pa``/``src_pa``).

    ``correlation_id``/``request_id`` are the host request's, so the
    :class:`Completion` can be matched to it.
    """

    correlation_id: str
    request_id: str
    sip: int
    cube: int
    pe: int
    op: Literal["read", "write", "fill", "copy"]
    addr: int
    nbytes: int
    host_buffer: str | None = None
    host_offset: int = 0
    pattern: str | None = None
    src_addr: int | None = None
    msg_type: Literal["dma_cmd"] = "dma_cmd"


@attrs.frozen
class Completion:
    """A block on PE (sip, cube, pe) finished its part of a request.

    Sent back towards whoever fanned the request out, which turns the
    completions into :class:`~kbus.protocol.messages.ResponseMsg` s. ``error``
    says why when ``success`` is False.
    """

    correlation_id: str
    request_id: str
    sip: int
    cube: int
    pe: int
    success: bool
    error: str | None = None
    msg_type: Literal["completion"] = "completion"


@attrs.frozen
class SipForward:
    """A host request passed from the IO_CPU of ``origin_sip`` to another SIP over a SIP<->SIP link.

    Broadcasts across SIPs (``target_sips``) fan out in the fabric: the host
    sends one message to one SIP, whose IO_CPU forwards a ``SipForward`` to each
    other target SIP. The wrapper marks the copy as already fanned out.
    """

    msg: MemoryWriteMsg | MemoryReadMsg | KernelLaunchMsg | PeDmaMsg | MmuMapMsg | MmuUnmapMsg
    origin_sip: int
    msg_type: Literal["sip_forward"] = "sip_forward"


FabricMessage: TypeAlias = DmaCommand | Completion | SipForward
"""A message that stays inside the device."""

attrs.resolve_types(DmaCommand)
attrs.resolve_types(Completion)
attrs.resolve_types(SipForward)

__all__ = ["Completion", "DmaCommand", "FabricMessage", "SipForward"]
