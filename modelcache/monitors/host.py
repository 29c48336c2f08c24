"""Host RAM, through psutil."""
from __future__ import annotations

import os
from typing import Optional

import psutil


class HostMonitor:
    """Host memory readings in bytes. ``available_bytes`` is what can be allocated without swapping."""

    def total_bytes(self) -> int:
        return int(psutil.virtual_memory().total)

    def available_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    def process_bytes(self, pid: Optional[int] = None) -> int:
        """Resident set size of ``pid`` (None: this process)."""
        return int(psutil.Process(pid or os.getpid()).memory_info().rss)
