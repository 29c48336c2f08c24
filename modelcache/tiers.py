"""Where a model can live, and the snapshot of an entry that ``ModelCache.info()`` returns."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


class Tier(enum.IntEnum):
    """Storage tiers, fastest first: a larger value is a lower tier."""

    DEVICE = 0     #: on the GPU, ready to run
    HOST = 1       #: in host RAM (bytes, a CPU session, pinned weights...)
    DISK = 2       #: in files under ``disk_dir``
    UNLOADED = 3   #: nothing kept; the loader runs again on next use

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class EntryInfo:
    """A consistent snapshot of one registered model. Sizes are bytes, times seconds."""

    name: str
    tier: Tier
    device_bytes: int
    host_bytes: int
    disk_path: Optional[str]
    hits: int            #: uses that found the model resident on the device
    misses: int          #: uses that had to wait for a load or swap-in
    loads: int           #: calls of the loader
    leases: int          #: leases held right now
    last_used: Optional[float]   #: wall-clock time (``time.time()``) of the last lease, or None
    backend: Optional[str] = None
    pinned: bool = False
    moving_to: Optional[Tier] = None   #: target tier of a move in flight, else None
    swap_in_seconds: Optional[float] = None  #: duration of the last move onto the device
    last_error: Optional[str] = None    #: the last failure of a move of this model (kept until the next one)
    details: Dict[str, Any] = field(default_factory=dict)  #: backend-specific (e.g. swap mode and why)
