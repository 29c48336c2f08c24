"""The interface every device memory signal implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MemoryReading:
    """One reading of a device's memory, in bytes. ``process_bytes`` is this process's use,
    or None where the signal cannot attribute memory to processes."""

    total_bytes: int
    free_bytes: int
    used_bytes: int
    process_bytes: Optional[int]


class DeviceMonitor(ABC):
    """Reads a device's memory. Must be thread-safe; ``free_bytes`` is called on every planned load."""

    #: True for :class:`SimulatedDevice`: backends then account device memory on it instead of
    #: allocating on a GPU.
    simulated: bool = False
    device: int = 0
    name: str = "device"

    @abstractmethod
    def total_bytes(self) -> int:
        """Total memory of the device."""

    @abstractmethod
    def free_bytes(self) -> int:
        """Memory free on the device right now, whoever else uses it."""

    def used_bytes(self) -> int:
        """Memory in use on the device by every process."""
        return self.total_bytes() - self.free_bytes()

    def process_bytes(self, pid: Optional[int] = None) -> Optional[int]:
        """Memory used by process ``pid`` (None: this process), or None if unknown."""
        return None

    def reading(self) -> MemoryReading:
        total, free = self.total_bytes(), self.free_bytes()
        return MemoryReading(total, free, total - free, self.process_bytes())

    def close(self) -> None:
        """Release what the monitor holds (NVML handles...)."""
