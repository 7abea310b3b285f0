"""kbus.sim: the virtual-time engine and its primitives.

Knows nothing about hardware or the protocol: a clock, simulated tasks, typed
bounded inboxes, links with latency and bandwidth, and the Block base class.
``HostWaiter``, ``TimerHandle`` and ``Waiter`` are the types of the wait
contract (:meth:`Sim.park`) and of :meth:`Sim.call_at`, for code that builds
its own primitives on the engine.
"""

from .block import Block
from .engine import HostWaiter, Sim, SimFuture, SimTask, TimerHandle, Waiter
from .inbox import Inbox, InboxFull
from .link import Link
from .runner import run
from .units import format_time, ms, ns, parse_time, ps, us

__all__ = [
    "Block",
    "HostWaiter",
    "Inbox",
    "InboxFull",
    "Link",
    "Sim",
    "SimFuture",
    "SimTask",
    "TimerHandle",
    "Waiter",
    "format_time",
    "ms",
    "ns",
    "parse_time",
    "ps",
    "run",
    "us",
]
