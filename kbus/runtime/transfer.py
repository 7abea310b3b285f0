"""Host <-> device data: upload snapshots and readbacks through registered host buffers.

Bulk data never rides in a message: the host registers a numpy buffer with
the device and a MemoryWriteMsg / MemoryReadMsg names it, so the DMA engines
move the bytes costed by the PCIe and fabric links. A sharded tensor is
stored shard-major (see :mod:`kbus.runtime.policy`), which is row-major order
whenever the shard dimension is the first non-trivial one.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from ..protocol import HostMessage, MemoryReadMsg, MemoryWriteMsg
from .mapping import target_groups
from .tensor import ShardInfo, _Storage

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["HostTransfers"]


class HostTransfers:
    """Uploads and readbacks of one runtime, and the host buffers it has registered."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._bufs = itertools.count(1)
        self.host_buffers: set[str] = set()
        """Names of the host buffers registered and not yet released."""

    def register(self, buf: npt.NDArray[Any]) -> str:
        name = f"{self._rt._cid}.buf{next(self._bufs)}"
        self._rt.device.register_host_buffer(name, buf)
        self.host_buffers.add(name)
        return name

    def unregister(self, name: str) -> None:
        self.host_buffers.discard(name)
        self._rt.device.unregister_host_buffer(name)

    @staticmethod
    def _row_major(st: _Storage) -> bool:
        """True when the storage order of ``st`` is the row-major order of the logical tensor."""
        p = st.placement
        return p.replicated or not st.shape or math.prod(st.shape[: p.shard_dim]) == 1

    def storage_bytes(self, arr: npt.NDArray[Any], st: _Storage) -> npt.NDArray[Any]:
        """A private C-contiguous copy of ``arr`` in ``st``'s storage order (the upload snapshot)."""
        if self._row_major(st):
            return np.array(arr, dtype=st.dtype, order="C", copy=True).reshape(-1)
        return np.concatenate([np.ascontiguousarray(arr[s.index]).reshape(-1) for s in st.shards])

    def from_storage(self, buf: npt.NDArray[np.uint8], st: _Storage) -> npt.NDArray[Any]:
        if self._row_major(st):
            return buf.view(st.dtype).reshape(st.shape)
        d = st.placement.shard_dim
        blocks = []
        for s in st.shards:
            shape = tuple(ix.stop - ix.start for ix in s.index)
            blocks.append(buf[s.offset : s.offset + s.nbytes].view(st.dtype).reshape(shape))
        return np.concatenate(blocks, axis=d)

    async def upload(self, st: _Storage, data: npt.NDArray[Any] | None, pattern: str | None) -> None:
        """Write ``data`` (storage order) or fill ``pattern`` into every shard or replica."""
        if not st.shards:
            return
        buf = self.register(data) if data is not None else None
        kind: Literal["pattern", "host_buffer_ref"] = "pattern" if buf is None else "host_buffer_ref"
        try:
            msgs: list[HostMessage] = []
            if st.placement.replicated or buf is None:
                # Every copy (or every shard of a fill) of one size at one PA is one
                # broadcast per SIP: on a fresh device that is one message per SIP
                # instead of one per PE.
                groups: dict[tuple[int, int, int], list[ShardInfo]] = {}
                for s in st.shards:
                    groups.setdefault((s.sip, s.pa, s.nbytes), []).append(s)
                for (sip, pa, nbytes), members in groups.items():
                    first = members[0]
                    offset = 0 if st.placement.replicated else first.offset
                    for _, cubes, pe in target_groups([m.coord for m in members], self._rt.config):
                        msgs.append(
                            MemoryWriteMsg(
                                self._rt._cid, self._rt._rid(), sip, first.cube, first.pe, pa, nbytes, kind, pattern,
                                target_cubes=cubes, target_pe=pe, host_buffer=buf, host_offset=offset,
                            )
                        )  # fmt: skip
            else:
                for s in st.shards:
                    msgs.append(
                        MemoryWriteMsg(
                            self._rt._cid, self._rt._rid(), s.sip, s.cube, s.pe, s.pa, s.nbytes, kind, pattern,
                            target_cubes=(s.cube,), target_pe=s.pe, host_buffer=buf, host_offset=s.offset,
                        )
                    )  # fmt: skip
            await self._rt._send(msgs)
        finally:
            if buf is not None:
                self.unregister(buf)

    async def readback(self, st: _Storage) -> npt.NDArray[Any]:
        buf = np.empty(st.nbytes, np.uint8)
        if not st.shards:
            return np.empty(st.shape, st.dtype)
        name = self.register(buf)
        try:
            shards = st.shards[:1] if st.placement.replicated else st.shards
            await self._rt._send(
                [
                    MemoryReadMsg(
                        self._rt._cid, self._rt._rid(), s.sip, s.cube, s.pe, s.pa, s.nbytes,
                        target_cubes=(s.cube,), target_pe=s.pe, host_buffer=name, host_offset=s.offset,
                    )
                    for s in shards
                ]
            )  # fmt: skip
        finally:
            self.unregister(name)
        return self.from_storage(buf, st)
