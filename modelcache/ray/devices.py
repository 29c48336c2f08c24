"""A replica's caches: one :class:`ModelCache` per GPU that Ray gave the replica, or one on a
:class:`SimulatedDevice` when it has none (CPU machines, tests)."""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Sequence, Union

from .._optional import require
from ..cache import ModelCache
from ..devices import DeviceMonitor, SimulatedDevice
from ..errors import ModelCacheError
from ..sizes import Size
from .errors import ReplicaSetupError
from .routing import INSTALL

#: what a replica without a GPU simulates, unless told otherwise
DEFAULT_SIMULATED_TOTAL = "16GiB"


def replica_devices() -> List[int]:
    """CUDA ordinals of the GPUs Ray assigned to this process: ``0..n-1`` (Ray makes exactly them
    visible through ``CUDA_VISIBLE_DEVICES``; with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``
    their own indices), or ``[]`` when it has none or is not a Ray worker.
    A fractional GPU (``num_gpus=0.5``: two replicas sharing one) counts as that GPU."""
    ray = require("ray", "modelcache.ray", INSTALL)
    if not ray.is_initialized():   # not a Ray worker (ray.get_gpu_ids() would start a local Ray)
        return []
    try:
        ids = ray.get_gpu_ids()
    except Exception:          # a Ray client, a shutting-down worker: no assignment to read
        ids = []
    if not ids:
        return []
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):   # Ray left every GPU visible
        return [int(i) for i in ids]
    return list(range(len(ids)))


def make_caches_for_replica(*, devices: Optional[Sequence[int]] = None,
                            simulated: Union[Size, Callable[[], DeviceMonitor]] = DEFAULT_SIMULATED_TOTAL,
                            **cache_kwargs: Any) -> List[ModelCache]:
    """The caches of one replica: one per GPU in ``devices`` (None: the GPUs Ray assigned to this
    replica, :func:`replica_devices`), each watched through NVML; with no GPU, one cache on a
    simulated device (``simulated``: its total size, or a function returning a monitor, e.g. a
    :class:`SimulatedDevice` with a link speed).

    ``cache_kwargs`` go to every :class:`ModelCache` (``device_budget``, ``reserve``,
    ``host_budget``, ``disk_dir``, ``policy``, ``max_swap_ins``...; a ``"80%"`` budget is of each
    device). ``monitor=`` gives one cache on that monitor. Raises :class:`ReplicaSetupError` naming
    the device that failed (the caches made before it are closed)."""
    if "monitor" in cache_kwargs:
        return [ModelCache(**cache_kwargs)]
    ordinals = replica_devices() if devices is None else list(devices)
    if not ordinals:
        monitor = simulated() if callable(simulated) else SimulatedDevice(simulated, name="simulated GPU")
        return [ModelCache(monitor=monitor, **cache_kwargs)]
    caches: List[ModelCache] = []
    try:
        for ordinal in ordinals:
            try:
                caches.append(ModelCache(device=ordinal, **cache_kwargs))
            except ModelCacheError as exc:
                raise ReplicaSetupError(f"could not open a cache on GPU {ordinal} (of {ordinals} given to this "
                                        f"replica): {exc}") from exc
    except BaseException:
        for cache in caches:
            cache.close(timeout=0)
        raise
    return caches


__all__ = ["replica_devices", "make_caches_for_replica", "DEFAULT_SIMULATED_TOTAL"]
