"""kbus.hw: the device model.

``DeviceConfig`` holds every count, size and timing; ``build_device`` lays out
the blocks (PCIE_EP, IO_CPU, M_CPU, NOC, PE_CPU, PE_DMA, PE_MMU, HBM, SRAM),
links and memory channels on a :class:`kbus.Sim`; :class:`Device` is the host
port scripts talk to. The data plane (:class:`Network`, :class:`NetLink`) moves
every byte as flows sharing links and memory channels max-min fairly, and each
PE's :class:`DmaEngine` issues all of the PE's transfers.
"""

from .config import DeviceConfig, LinkSpec, available_presets
from .device import BlockStats, Device, HostDevice, LinkStats, PeNode, build_device
from .dma import DmaEngine
from .network import Flow, NetLink, Network

__all__ = [
    "BlockStats",
    "Device",
    "DeviceConfig",
    "DmaEngine",
    "Flow",
    "HostDevice",
    "LinkSpec",
    "LinkStats",
    "NetLink",
    "Network",
    "PeNode",
    "available_presets",
    "build_device",
]
