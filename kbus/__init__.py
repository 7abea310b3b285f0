"""kbus: a multi-chip AI accelerator emulated as an asyncio message bus.

Everything a user needs is re-exported here; see the package READMEs under
``kbus/`` for how the layers fit.
"""

from .errors import (
    AllocatorError,
    CodecError,
    ConfigError,
    DeadlockError,
    DeviceError,
    KbusError,
    KernelError,
    OutOfDeviceMemory,
    TensorFreedError,
)
from .sim import Block, Inbox, InboxFull, Link, Sim, SimFuture, SimTask, format_time, ms, ns, parse_time, ps, run, us

__version__ = "0.1.0"

__all__ = [
    "AllocatorError",
    "Block",
    "CodecError",
    "ConfigError",
    "DeadlockError",
    "DeviceError",
    "Inbox",
    "InboxFull",
    "KbusError",
    "KernelError",
    "Link",
    "OutOfDeviceMemory",
    "Sim",
    "SimFuture",
    "SimTask",
    "TensorFreedError",
    "__version__",
    "format_time",
    "ms",
    "ns",
    "parse_time",
    "ps",
    "run",
    "us",
]
