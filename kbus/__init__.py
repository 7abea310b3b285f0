"""kbus: a multi-chip AI accelerator emulated as an asyncio message bus.

Everything a user needs is re-exported here; see the package READMEs under
``kbus/`` for how the layers fit.
"""

from . import lang
from .errors import (
    AllocatorError,
    CodecError,
    ConfigError,
    DeadlockError,
    DeviceError,
    KbusError,
    KernelError,
    MemoryLeakError,
    OutOfDeviceMemory,
    RecordingError,
    RemoteError,
    TensorFreedError,
)
from .hw import DeviceConfig, build_device
from .lang import kernel
from .remote import RemoteDevice, ReplayResult, connect_device, replay, serve_device
from .runtime import Replicate, Runtime, Shard, Tensor, open_device
from .sim import Block, Inbox, InboxFull, Link, Sim, SimFuture, SimTask, format_time, ms, ns, parse_time, ps, run, us
from .sim.timeouts import fail_after, move_on_after
from .sweep import SweepError, SweepInterrupted, WorkloadError, sweep
from .trace import TraceError

__version__ = "0.1.0"

__all__ = [
    "AllocatorError",
    "Block",
    "CodecError",
    "ConfigError",
    "DeadlockError",
    "DeviceConfig",
    "DeviceError",
    "Inbox",
    "InboxFull",
    "KbusError",
    "KernelError",
    "Link",
    "MemoryLeakError",
    "OutOfDeviceMemory",
    "RecordingError",
    "RemoteDevice",
    "RemoteError",
    "ReplayResult",
    "Replicate",
    "Runtime",
    "Shard",
    "Sim",
    "SimFuture",
    "SimTask",
    "SweepError",
    "SweepInterrupted",
    "Tensor",
    "TensorFreedError",
    "TraceError",
    "WorkloadError",
    "__version__",
    "build_device",
    "connect_device",
    "fail_after",
    "format_time",
    "kernel",
    "lang",
    "move_on_after",
    "ms",
    "ns",
    "open_device",
    "parse_time",
    "ps",
    "replay",
    "run",
    "serve_device",
    "sweep",
    "us",
]
