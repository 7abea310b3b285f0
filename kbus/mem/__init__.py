"""kbus.mem: allocators, page tables and the byte backing store.

Plain synchronous code with no knowledge of the engine or the protocol; the
hardware model (``kbus.hw``) and the host runtime (``kbus.runtime``) build on
it. See ``README.md`` in this package for the map and the fill-pattern grammar.
"""

from kbus.mem.alloc import FreeListAllocator, PEMemAllocator, VirtualAllocator, format_bytes
from kbus.mem.pagetable import (
    MapConflict,
    PageFault,
    PageTable,
    Segment,
    SharedMapping,
    SharedMappingCache,
    SharedRun,
)
from kbus.mem.store import PATTERN_GRAMMAR, MemoryStore, pattern_bytes

__all__ = [
    "PATTERN_GRAMMAR",
    "FreeListAllocator",
    "MapConflict",
    "MemoryStore",
    "PEMemAllocator",
    "PageFault",
    "PageTable",
    "Segment",
    "SharedMapping",
    "SharedMappingCache",
    "SharedRun",
    "VirtualAllocator",
    "format_bytes",
    "pattern_bytes",
]
