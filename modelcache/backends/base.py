"""The interface a backend implements: moving one model between tiers and counting its bytes.

A backend is one module in this package with heavy imports inside its methods. The public
methods of :class:`Backend` check the handle's tier and call the ``_..._impl`` methods, which
are what a backend writes. A move that raises must leave the handle as it was.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Hashable, Optional, Tuple

from ..errors import ConfigError
from ..devices.base import DeviceMemory, DeviceMonitor
from ..tiers import Tier


class Handle:
    """One model's state in the tier it is in. Backends subclass it to hold their objects.

    Sizes are bytes: ``device_bytes`` held on the device now, ``host_bytes`` held in host RAM now
    (a backend may keep host bytes while on the device, e.g. pinned weights or plan bytes).
    """

    def __init__(self, name: str, tier: Tier) -> None:
        self.name = name
        self.tier = tier
        self.device_bytes = 0
        self.host_bytes = 0
        self.disk_path: Optional[str] = None

    def estimated_device_bytes(self) -> int:
        """Device bytes the model will take once on the device (exact where the backend can be)."""
        return self.device_bytes

    def firm_device_bytes(self) -> int:
        """Device bytes the model needs for certain, without planning estimates (a session not yet
        measured): what makes it too large for the budget."""
        return self.estimated_device_bytes()

    def estimated_host_bytes(self) -> int:
        """Host bytes the model will take once moved to the host tier."""
        return self.host_bytes or self.estimated_device_bytes()

    def parked_device_bytes(self) -> int:
        """Device bytes still held while the model is off the device tier (e.g. a long-lived
        session kept for fast swap-ins). The cache counts them against the budget."""
        return 0

    def unpark_frees_bytes(self) -> int:
        """Device bytes :meth:`Backend.unpark` would free on the host tier (for a model on the
        device: once evicted). 0: nothing, e.g. the bytes are shared with models still using them."""
        return self.parked_device_bytes()

    def kept_after_eviction(self) -> int:
        """Of ``device_bytes``, what a move to the host tier would keep on the device."""
        return 0

    def shared_device(self) -> Optional[Tuple[Hashable, int]]:
        """``(key, bytes)`` of device memory this model keeps for fast swap-ins, shared with the
        other models of the same key (e.g. an ONNX Runtime session of one architecture), or None.
        It is freed once every model holding it is off the device and unparked. By default the
        model's own: what :meth:`unpark_frees_bytes` (parked) or :meth:`kept_after_eviction`
        (resident) says, under a key of its own."""
        nbytes = self.unpark_frees_bytes() if self.tier is Tier.HOST else self.kept_after_eviction()
        return (("own", id(self)), nbytes) if nbytes > 0 else None

    def shared_seconds(self) -> float:
        """Seconds it would take to make this model's shared device memory again once freed (e.g.
        to create the session): the cache frees it only after a request for room has waited that
        long, unless waiting for leases to end could not make the room anyway."""
        return 0.0

    def shared_key(self) -> Optional[Hashable]:
        """The key of the shared device memory this model's next swap-in will use (and counted on
        when it was planned), or None: such memory must not be freed while the swap-in is on its way."""
        shared = self.shared_device()
        return shared[0] if shared is not None else None

    def details(self) -> Dict[str, Any]:
        """Backend-specific facts for ``EntryInfo.details``."""
        return {}


@dataclass(frozen=True)
class BackendContext:
    """What a backend gets from the cache that owns it."""

    device: int
    monitor: DeviceMonitor
    disk_dir: Optional[str]

    @property
    def memory(self) -> DeviceMemory:
        """The device's memory operations (the same calls on a GPU and on a simulated device)."""
        return self.monitor.memory


class Backend(ABC):
    """Moves models of one kind between tiers. One instance per cache, shared by its models;
    methods may be called from several threads at once for different handles."""

    name: ClassVar[str] = "backend"
    supports_disk: ClassVar[bool] = True

    def __init__(self, context: BackendContext) -> None:
        self.context = context

    # detection ------------------------------------------------------------------------------
    @classmethod
    def accepts(cls, value: Any, options: Dict[str, Any]) -> bool:
        """True if this backend can take ``value`` (what a loader returned). Must not import heavy
        packages: it runs for every backend during ``backend="auto"`` detection."""
        return False

    # public moves: checks, then the backend's _impl ----------------------------------------
    def load(self, name: str, value: Any, options: Dict[str, Any]) -> Handle:
        """Turn a loader's result into a handle, usually on the host tier (some values, such as a
        live CUDA session, arrive on the device)."""
        handle = self._load_impl(name, value, options)
        if handle.tier not in (Tier.HOST, Tier.DEVICE):
            raise AssertionError(f"{type(self).__name__}._load_impl returned a handle on {handle.tier}")
        return handle

    def to_device(self, handle: Handle) -> None:
        self._expect(handle, Tier.HOST)
        self._to_device_impl(handle)
        handle.tier = Tier.DEVICE

    def to_host(self, handle: Handle) -> None:
        self._expect(handle, Tier.DEVICE)
        self._to_host_impl(handle)
        handle.tier = Tier.HOST
        handle.device_bytes = 0

    def to_disk(self, handle: Handle, directory: str) -> None:
        self._expect(handle, Tier.HOST)
        if not self.supports_disk:
            raise ConfigError(f"the {self.name} backend has no disk tier", model=handle.name)
        self._to_disk_impl(handle, directory)
        handle.tier = Tier.DISK
        handle.host_bytes = 0

    def from_disk(self, handle: Handle) -> None:
        self._expect(handle, Tier.DISK)
        self._from_disk_impl(handle)
        handle.tier = Tier.HOST

    def unpark(self, handle: Handle) -> None:
        """Free the device bytes a parked (host-tier) handle keeps; it stays on the host tier."""
        self._expect(handle, Tier.HOST)
        self._unpark_impl(handle)

    def _unpark_impl(self, handle: Any) -> None:
        pass

    def release(self, handle: Handle) -> None:
        """Free everything the handle holds, in any tier (files too). Must not raise."""
        self._release_impl(handle)
        handle.device_bytes = handle.host_bytes = 0
        handle.disk_path = None
        handle.tier = Tier.UNLOADED

    def model(self, handle: Handle) -> Any:
        """What ``use()`` hands out for a handle on the device."""
        if handle.tier is not Tier.DEVICE:     # _expect() written out: every cache hit comes here
            self._expect(handle, Tier.DEVICE)
        return self._model_impl(handle)

    def host_model(self, handle: Any) -> Optional[Any]:
        """A model that serves from the host tier while this one is off the device, or None.
        Called with the cache's lock held: return an existing object, never build one here."""
        return None

    def stats(self) -> Dict[str, Any]:
        """Backend-wide counters for ``ModelCache.stats()`` (prefixed with the backend's name)."""
        return {}

    def reclaimable_device_bytes(self) -> int:
        """Device bytes counted in the models' figures that the runtime keeps without need (memory
        its runs left in an arena, of models off the device) and :meth:`reclaim_device_bytes`
        gives back without moving any model. Called with the cache's lock held: a cheap figure."""
        return 0

    def soft_device_bytes(self) -> int:
        """Device bytes counted in the models' figures that the runtime may not hold right now
        (working memory of runs an arena may keep, counted whether or not it does). The cache's
        reading of what runtimes take on their own takes its floor without them, so they are
        never counted twice. Called with the cache's lock held: a cheap figure."""
        return 0

    def reclaim_device_bytes(self) -> None:
        """Give :meth:`reclaimable_device_bytes` back to the device (the cache calls it, without
        its lock, before it evicts models or drops shared memory to make room)."""

    def close(self) -> None:
        """Release backend-wide resources (pools, streams)."""

    def remove_files(self) -> None:
        """Remove the files this backend keeps outside the cache's disk folder (at interpreter exit,
        for a cache that was not closed). Must not raise."""

    @staticmethod
    def _expect(handle: Handle, tier: Tier) -> None:
        if handle.tier is not tier:
            raise AssertionError(f"model {handle.name!r}: expected a handle on {tier}, found {handle.tier}")

    # what a backend writes ------------------------------------------------------------------
    @abstractmethod
    def _load_impl(self, name: str, value: Any, options: Dict[str, Any]) -> Handle: ...

    @abstractmethod
    def _to_device_impl(self, handle: Any) -> None: ...

    @abstractmethod
    def _to_host_impl(self, handle: Any) -> None: ...

    def _to_disk_impl(self, handle: Any, directory: str) -> None:
        raise NotImplementedError

    def _from_disk_impl(self, handle: Any) -> None:
        raise NotImplementedError

    @abstractmethod
    def _release_impl(self, handle: Any) -> None: ...

    @abstractmethod
    def _model_impl(self, handle: Any) -> Any: ...
