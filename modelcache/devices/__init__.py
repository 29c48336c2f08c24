"""Devices: memory readings (:class:`DeviceMonitor`: NVML, psutil for the host, simulated) and
memory operations (:class:`DeviceMemory`: CUDA, simulated), and host memory pools.

A new memory signal is one :class:`DeviceMonitor` subclass in its own module here; a new kind of
device is one :class:`DeviceMemory` implementation. Heavy imports (pynvml, cuda-python) happen
inside those modules' methods.
"""
from .base import Buffer, Charge, DeviceMemory, DeviceMonitor, InlineRunner, MemoryReading, Runner, ThreadRunner
from .host import HostBlock, HostMonitor, HostPool, align
from .nvml import NvmlMonitor
from .simulated import SimulatedAllocation, SimulatedDevice, SimulatedMemory

__all__ = ["DeviceMonitor", "MemoryReading", "DeviceMemory", "Buffer", "Charge", "Runner", "InlineRunner",
           "ThreadRunner", "HostMonitor", "HostBlock", "HostPool", "align", "NvmlMonitor", "SimulatedDevice",
           "SimulatedAllocation", "SimulatedMemory"]
