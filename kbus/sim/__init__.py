"""kbus.sim: the virtual-time engine and its primitives.

Knows nothing about hardware or the protocol: a clock, simulated tasks, typed
bounded inboxes, links with latency and bandwidth, and the Block base class.
"""

from .block import Block
from .engine import Sim, SimFuture, SimTask
from .inbox import Inbox, InboxFull
from .link import Link
from .runner import run
from .units import format_time, ms, ns, parse_time, ps, us

__all__ = [
    "Block",
    "Inbox",
    "InboxFull",
    "Link",
    "Sim",
    "SimFuture",
    "SimTask",
    "format_time",
    "ms",
    "ns",
    "parse_time",
    "ps",
    "run",
    "us",
]
