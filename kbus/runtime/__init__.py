"""kbus.runtime: the host side. ``open_device``, the ``torch`` handle, tensors, placement, builtin kernels.

See README.md in this package for the model (work queue, VA layout, lifetime)
and :mod:`kbus.runtime.builtins` for the kernel argument convention.
"""

from .builtins import TensorDesc
from .policy import DPPolicy, Placement, Replicate, Shard, ShardPlan, place
from .runtime import MemoryLeakError, MemoryStats, PeMemory, Runtime, Scope, open_device
from .tensor import ShardInfo, Tensor

__all__ = [
    "DPPolicy",
    "MemoryLeakError",
    "MemoryStats",
    "PeMemory",
    "Placement",
    "Replicate",
    "Runtime",
    "Scope",
    "Shard",
    "ShardInfo",
    "ShardPlan",
    "Tensor",
    "TensorDesc",
    "open_device",
    "place",
]
