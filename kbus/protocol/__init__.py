"""The messages blocks and the host exchange, and their wire form.

Host<->device messages live in :mod:`kbus.protocol.messages`, device-internal
ones in :mod:`kbus.protocol.fabric`; :mod:`kbus.protocol.codec` turns any of
them into JSON or msgpack bytes and back. This package knows nothing about the
engine or the hardware model. See README.md.
"""

from kbus.errors import CodecError
from kbus.protocol.codec import (
    MESSAGE_TYPES,
    AnyMessage,
    Format,
    decode,
    encode,
    from_wire,
    register,
    roundtrip,
    to_wire,
)
from kbus.protocol.fabric import Completion, DmaCommand, FabricMessage, SipForward
from kbus.protocol.messages import (
    HostMessage,
    KernelArg,
    KernelLaunchMsg,
    KernelRef,
    MapEntry,
    MemoryReadMsg,
    MemoryWriteMsg,
    Message,
    MmuMapMsg,
    MmuUnmapMsg,
    PeDmaMsg,
    PeTarget,
    ResponseMsg,
    ScalarArg,
    Targets,
    TensorArg,
    TensorArgShard,
    UnmapEntry,
)

__all__ = [
    "MESSAGE_TYPES",
    "AnyMessage",
    "CodecError",
    "Completion",
    "DmaCommand",
    "FabricMessage",
    "Format",
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
    "SipForward",
    "Targets",
    "TensorArg",
    "TensorArgShard",
    "UnmapEntry",
    "decode",
    "encode",
    "from_wire",
    "register",
    "roundtrip",
    "to_wire",
]
