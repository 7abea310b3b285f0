"""kbus.hw: the device model.

``DeviceConfig`` holds every count, size and timing; ``build_device`` lays out
the blocks (PCIE_EP, IO_CPU, M_CPU, NOC, PE_CPU, PE_DMA, PE_MMU, HBM, SRAM) and
links on a :class:`kbus.Sim`; :class:`Device` is the host port scripts talk to.
"""

from .config import DeviceConfig, LinkSpec, available_presets
from .device import BlockStats, Device, PeNode, build_device

__all__ = ["BlockStats", "Device", "DeviceConfig", "LinkSpec", "PeNode", "available_presets", "build_device"]
