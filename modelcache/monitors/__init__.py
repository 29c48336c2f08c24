"""Memory signals, one module each: NVML (real GPUs), psutil (host RAM), and a simulated device.

A new signal is one subclass of :class:`DeviceMonitor` in its own module.
"""
from .base import DeviceMonitor, MemoryReading
from .host import HostMonitor
from .nvml import NvmlMonitor
from .simulated import SimulatedAllocation, SimulatedDevice

__all__ = ["DeviceMonitor", "MemoryReading", "HostMonitor", "NvmlMonitor", "SimulatedDevice",
           "SimulatedAllocation"]
