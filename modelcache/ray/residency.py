"""What a replica reports to the router: where each of its models lives and how much room its
caches have left. Ray-free: the replica writes it (:func:`residency_stats`), the router reads it
(:meth:`Residency.from_stats`), and tests can drive both alone.

The routing stats of a replica are a small JSON-ready dict::

    {"modelcache": 1,                       # format version (absent: not a modelcache replica)
     "models": {"en-v2": ["device", 104857600], "de-v1": ["host", 52428800], ...},
     "free_bytes": 734003200,               # device bytes a swap-in may take now without evicting
     "budget_bytes": 6442450944,            #   (in the replica's cache with the most room)
     "devices": [{"device": 0, "budget_bytes": ..., "free_bytes": ..., "simulated": false}]}

Tiers: ``"device"`` (ready to run), ``"loading"`` (a request on this replica is bringing it to
the device now), ``"host"`` (parked in host RAM), ``"disk"`` (in the disk tier). Unloaded models
are left out. Bytes are the model's device bytes (measured at its last swap-in; until then its
host bytes, about its weights). Nothing in it changes with each request (no counters, no clock):
Ray broadcasts routing stats to every router when they change, so they change only with residency.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from ..tiers import Tier

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import ModelCache

#: the key (and format version) that marks routing stats written by :func:`residency_stats`
STATS_KEY = "modelcache"
STATS_VERSION = 1

DEVICE, LOADING, HOST, DISK = "device", "loading", "host", "disk"
#: tiers in the order a router prefers them (a model loading counts as on the device: a request
#: sent there waits for that load instead of starting another one elsewhere)
TIER_RANK: Dict[str, int] = {DEVICE: 0, LOADING: 0, HOST: 1, DISK: 2}
ABSENT_RANK = 3
_TIER_NAMES = {Tier.DEVICE: DEVICE, Tier.HOST: HOST, Tier.DISK: DISK}


def device_room(cache: "ModelCache", stats: Optional[Mapping[str, Any]] = None) -> int:
    """Device bytes a swap-in may take in ``cache`` now without evicting: its budget less what it
    accounts, and at most the device's free memory less the reserve (other processes count)."""
    stats = cache.stats() if stats is None else stats
    room = int(stats["device.budget_bytes"]) - int(stats["device.accounted_bytes"])
    if "device.free_bytes" in stats:
        room = min(room, int(stats["device.free_bytes"]) - int(stats["device.reserve_bytes"]))
    return max(0, room)


def residency_stats(caches: Sequence["ModelCache"], *, prefix: str = "", loading: Collection[str] = (),
                    sizes: Optional[Mapping[str, int]] = None) -> Dict[str, Any]:
    """The routing stats of a replica holding ``caches`` (see the module docstring).

    Args:
        caches: the replica's caches (one per GPU it holds).
        prefix: only models whose cache name starts with it, reported under the id after it
            (what ``cache.multiplexed(prefix=...)`` registered).
        loading: model ids that a request on this replica is bringing to the device now.
        sizes: device bytes per cache name, measured at earlier swap-ins (models not on the
            device report these, else their host bytes).
    """
    models: Dict[str, List[Any]] = {}
    per_device: List[Dict[str, Any]] = []
    free_best = 0
    budget_total = 0
    sizes = sizes or {}
    for cache in caches:
        stats = cache.stats()
        budget = int(stats["device.budget_bytes"])
        room = device_room(cache, stats)
        free_best = max(free_best, room)
        budget_total += budget
        per_device.append({"device": cache.device, "simulated": bool(getattr(cache.monitor, "simulated", False)),
                           "budget_bytes": budget, "free_bytes": room})
        for info in cache.entries():
            if not info.name.startswith(prefix):
                continue
            model_id = info.name[len(prefix):]
            tier = _TIER_NAMES.get(info.tier)
            if info.tier is not Tier.DEVICE and info.moving_to is Tier.DEVICE:
                tier = LOADING
            if tier is None and model_id not in loading:
                continue                       # unloaded and nobody is asking for it here
            if tier != DEVICE and model_id in loading:
                tier = LOADING
            nbytes = info.device_bytes if info.tier is Tier.DEVICE and info.device_bytes else \
                sizes.get(info.name) or info.host_bytes
            models[model_id] = [tier, int(nbytes)]
    for model_id in loading:                   # asked for but not registered yet
        models.setdefault(model_id, [LOADING, 0])
    return {STATS_KEY: STATS_VERSION, "models": models, "free_bytes": free_best, "budget_bytes": budget_total,
            "devices": per_device}


def device_model_ids(stats: Mapping[str, Any]) -> List[str]:
    """The ids on the device or loading to it: what a replica reports to Ray as its multiplexed
    model ids (so Ray's own routing by model id, where it is used, stays right)."""
    return sorted(model_id for model_id, (tier, _) in stats.get("models", {}).items() if TIER_RANK.get(tier) == 0)


@dataclass(frozen=True)
class Residency:
    """A replica's routing stats, read back (see :func:`residency_stats`)."""

    models: Dict[str, Tuple[str, int]] = field(default_factory=dict)   #: id -> (tier, device bytes)
    free_bytes: int = 0
    budget_bytes: int = 0
    #: models on the device or loading there; the sum and count of the sizes reported (> 0):
    #: derived from ``models`` once, as routers read them for every request
    on_device: int = field(init=False, default=0)
    sizes_sum: int = field(init=False, default=0)
    sizes_count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        sizes = [nbytes for _, nbytes in self.models.values() if nbytes > 0]
        object.__setattr__(self, "on_device", sum(1 for tier, _ in self.models.values() if TIER_RANK.get(tier) == 0))
        object.__setattr__(self, "sizes_sum", sum(sizes))
        object.__setattr__(self, "sizes_count", len(sizes))

    @classmethod
    def from_stats(cls, stats: Any) -> Optional["Residency"]:
        """The residency in ``stats``, or None if they are not a modelcache replica's (or malformed)."""
        if not isinstance(stats, Mapping) or stats.get(STATS_KEY) != STATS_VERSION:
            return None
        try:
            models = {str(k): (str(v[0]), int(v[1])) for k, v in stats.get("models", {}).items()}
            return cls(models, int(stats.get("free_bytes", 0)), int(stats.get("budget_bytes", 0)))
        except (TypeError, ValueError, IndexError, AttributeError):
            return None

    def tier(self, model_id: str) -> Optional[str]:
        held = self.models.get(model_id)
        return held[0] if held is not None else None

    def rank(self, model_id: str) -> int:
        """0: on the device (or loading), 1: host, 2: disk, 3: not here."""
        held = self.models.get(model_id)
        return ABSENT_RANK if held is None else TIER_RANK.get(held[0], ABSENT_RANK)

    def nbytes(self, model_id: str) -> Optional[int]:
        held = self.models.get(model_id)
        return held[1] if held is not None and held[1] > 0 else None


__all__ = ["STATS_KEY", "STATS_VERSION", "DEVICE", "LOADING", "HOST", "DISK", "TIER_RANK", "Residency",
           "residency_stats", "device_room", "device_model_ids"]
