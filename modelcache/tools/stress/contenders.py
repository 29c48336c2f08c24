"""The ways of serving a stress trace: modelcache (one contender per policy) and the baselines a
user would otherwise write (LRU by model count as Ray Serve does it; the seed's load-per-request).
A contender's device memory is this process's growth since it started (NVML), or its allocations
on a simulated device."""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...devices import DeviceMonitor
from ...tiers import Tier
from .models import ModelSpec

MiB = 1 << 20


class Contender:
    """One way of serving the trace. Device memory is this process's growth since the contender
    started (NVML), or its allocations on a simulated device."""

    name = "contender"

    def __init__(self, monitor: DeviceMonitor) -> None:
        self.monitor = monitor
        self._base = 0 if monitor.simulated else (monitor.process_bytes() or 0)

    def serve(self, spec: ModelSpec) -> Tuple[np.ndarray, bool, bool]:
        """Run ``spec`` on its input: (output, hit, waited), where ``waited`` says the request
        waited for room or for another request's model to leave before its own could load."""
        raise NotImplementedError

    def device_bytes(self) -> int:
        return (self.monitor.process_bytes() or 0) - self._base

    def tiers(self) -> Tuple[int, int]:
        """(models on the device, models on the host)."""
        return (0, 0)

    def accounted_bytes(self) -> Optional[int]:
        """Device bytes the contender's own books hold now (None: it keeps none)."""
        return None

    def swap_ins(self) -> int:
        return 0

    def median_swap_in(self) -> Optional[float]:
        return None

    def extra(self) -> Dict[str, Any]:
        """Figures of the contender's own, for the report (after the run)."""
        return {"sessions_created": self.swap_ins()}

    def close(self) -> None:
        pass


class ModelCacheContender(Contender):
    def __init__(self, policy: str, specs: Sequence[ModelSpec], monitor: DeviceMonitor, budget: int,
                 reserve: int, max_swap_ins: Optional[int] = None, prepare: bool = True,
                 progress: Optional[Callable[[str, int, int], None]] = None,
                 provider_options: Optional[Dict[str, str]] = None) -> None:
        """Registers ``specs``, parks them on the host and (``prepare``) swaps each in once;
        ``progress(name, done, total)`` counts those steps; ``provider_options`` go to ONNX
        Runtime's CUDA provider."""
        from ...cache import ModelCache
        self.name = f"modelcache-{policy}"
        self.cache = ModelCache(monitor=monitor, device_budget=budget, reserve=reserve, policy=policy,
                                max_swap_ins=max_swap_ins, watch_interval=0.1)
        threshold = max(1024, min(MiB, min(s.nbytes for s in specs) // 8))
        generated = all(s.architecture.startswith("mlp") for s in specs)
        options: Dict[str, Any] = {"weights_threshold": threshold, "host_session": False}
        if generated:       # one topology at many widths, known to be right in weights mode: one session
            options.update(mode="weights", verify=False, share_sizes=True)
        if provider_options:
            options["provider_options"] = dict(provider_options)
        for spec in specs:
            self.cache.register(spec.name, spec.path, backend="onnxruntime", **options)
        task, total = f"{self.name} setup", len(specs) * (2 if prepare else 1)
        report = progress or (lambda name, done, total: None)
        report(task, 0, total)
        for k, fut in enumerate([self.cache.prefetch(spec.name, tier=Tier.HOST, timeout=None) for spec in specs]):
            fut.result()
            report(task, k + 1, total)
        if prepare:     # as a service would at start: each model's first swap-in (its check) happens now
            for k, spec in enumerate(specs):
                with self.cache.use(spec.name, timeout=None):
                    pass
                self.cache.evict(spec.name)
                report(task, len(specs) + k + 1, total)
        self._prepared = self.cache.stats().get("onnxruntime.sessions.created", 0)
        self._base_accounted = 0
        if not monitor.simulated:    # parked sessions are in both baselines (a simulated device's: in neither)
            self._base_accounted = self.cache.accounted_bytes()
        super().__init__(monitor)     # the baseline: after parking every model on the host

    def serve(self, spec: ModelSpec) -> Tuple[np.ndarray, bool, bool]:
        lease = self.cache.use(spec.name, timeout=300)
        model = lease.acquire()
        try:
            return model.run(None, spec.feed)[0], bool(lease.hit), lease.waited
        finally:
            lease.release()

    def tiers(self) -> Tuple[int, int]:
        stats = self.cache.stats()
        return int(stats["models.device"]), int(stats["models.host"])

    def accounted_bytes(self) -> Optional[int]:
        return self.cache.accounted_bytes() - self._base_accounted

    def swap_ins(self) -> int:
        return int(self.cache.stats().get("swap_in.count", 0))

    def median_swap_in(self) -> Optional[float]:
        return self.cache.stats().get("swap_in.seconds.p50")

    def extra(self) -> Dict[str, Any]:
        stats = self.cache.stats()
        keys = ("swap_in.seconds.p95", "swap_in.seconds.p99", "swap_in.seconds.max", "swap_out.seconds.p50",
                "swap_out.seconds.p99", "waits.room", "errors.busy", "evictions", "unparks", "onnxruntime.sessions",
                "onnxruntime.sessions.bytes", "onnxruntime.sessions.created", "device.runtime_bytes")
        out = {f"cache.{k}": stats[k] for k in keys if k in stats}
        out["sessions_created"] = int(stats.get("onnxruntime.sessions.created", 0)) - self._prepared
        return out

    def close(self) -> None:
        self.cache.close()


class _SessionContender(Contender):
    """Shared by the baselines: stock ONNX Runtime sessions created from the model file."""

    def __init__(self, monitor: DeviceMonitor, provider_options: Optional[Dict[str, str]] = None) -> None:
        import onnxruntime as ort
        super().__init__(monitor)
        self.ort = ort
        self.providers: List[Any] = ["CPUExecutionProvider"] if monitor.simulated else \
            [("CUDAExecutionProvider", dict(provider_options or {})), "CPUExecutionProvider"]
        self._loads = 0
        self._load_times: List[float] = []
        self._lock = threading.Lock()

    def _create(self, spec: ModelSpec) -> Tuple[Any, Any]:
        """A stock session of ``spec``, charged on the device as modelcache's are: its weights, a
        session's overhead and a run's working memory, which its own arena keeps while it exists
        (booked on a simulated device, whose link it crosses too)."""
        memory = self.monitor.memory
        start = time.perf_counter()
        if self.monitor.simulated:
            self.monitor.copy(spec.nbytes)     # type: ignore[attr-defined]   # the weights cross the link
        session, charge = memory.measure(lambda: self.ort.InferenceSession(spec.path, providers=self.providers),
                                         expected_bytes=spec.nbytes + memory.session_overhead_bytes
                                         + memory.run_overhead_bytes,
                                         owner=spec.name)
        with self._lock:
            self._loads += 1
            self._load_times.append(time.perf_counter() - start)
        return session, charge

    def swap_ins(self) -> int:
        return self._loads

    def median_swap_in(self) -> Optional[float]:
        with self._lock:
            return float(np.median(self._load_times)) if self._load_times else None

    def close(self) -> None:
        """Drop every session now, so the next contender starts from a quiet device."""
        for allocation in self._drop_sessions():
            if allocation is not None:
                allocation.free()

    def _drop_sessions(self) -> List[Any]:
        return []


class LruCountContender(_SessionContender):
    """LRU by model count (Ray Serve's max_num_models_per_replica)."""

    def __init__(self, count: int, monitor: DeviceMonitor, provider_options: Optional[Dict[str, str]] = None) -> None:
        super().__init__(monitor, provider_options)
        self.name = "lru-count"
        self.count = count
        self.sessions: "collections.OrderedDict[str, Tuple[Any, Any]]" = collections.OrderedDict()
        self.loading: Dict[str, threading.Lock] = collections.defaultdict(threading.Lock)

    def serve(self, spec: ModelSpec) -> Tuple[np.ndarray, bool, bool]:
        """Never waits for room (it counts models, not bytes): it overshoots instead."""
        with self._lock:
            entry = self.sessions.get(spec.name)
            if entry is not None:
                self.sessions.move_to_end(spec.name)
            load_lock = self.loading[spec.name]
        hit = entry is not None      # a hit: resident on arrival (waiting for a load is a miss)
        if entry is None:
            with load_lock:          # one load per model id at a time, as Ray Serve does
                with self._lock:
                    entry = self.sessions.get(spec.name)
                if entry is None:
                    entry = self._create(spec)
                    evicted = []
                    with self._lock:
                        self.sessions[spec.name] = entry
                        while len(self.sessions) > self.count:
                            evicted.append(self.sessions.popitem(last=False)[1])
                    for _, allocation in evicted:
                        if allocation is not None:
                            allocation.free()
        return entry[0].run(None, spec.feed)[0], hit, False

    def tiers(self) -> Tuple[int, int]:
        with self._lock:
            return len(self.sessions), 0

    def _drop_sessions(self) -> List[Any]:
        with self._lock:
            entries, self.sessions = list(self.sessions.values()), collections.OrderedDict()
        return [allocation for _, allocation in entries]


class NaiveContender(_SessionContender):
    """The seed's recipe: load on a miss, unload the rest (one model on the device at a time)."""

    def __init__(self, monitor: DeviceMonitor, provider_options: Optional[Dict[str, str]] = None) -> None:
        super().__init__(monitor, provider_options)
        self.name = "naive"
        self.current: Optional[Tuple[str, Any, Any]] = None
        self._serve_lock = threading.Lock()

    def serve(self, spec: ModelSpec) -> Tuple[np.ndarray, bool, bool]:
        current = self.current
        resident = current is not None and current[0] == spec.name   # on arrival
        waited = not self._serve_lock.acquire(blocking=False)       # the one model's room is taken
        if waited:
            self._serve_lock.acquire()
        try:
            hit = resident and self.current is current
            if not (self.current is not None and self.current[0] == spec.name):
                if self.current is not None:
                    _, _, allocation = self.current
                    self.current = None          # drop the session: its device memory goes
                    if allocation is not None:
                        allocation.free()
                session, allocation = self._create(spec)
                self.current = (spec.name, session, allocation)
            assert self.current is not None
            return self.current[1].run(None, spec.feed)[0], hit, waited
        finally:
            self._serve_lock.release()

    def tiers(self) -> Tuple[int, int]:
        return (1 if self.current else 0), 0

    def _drop_sessions(self) -> List[Any]:
        with self._serve_lock:
            current, self.current = self.current, None
        return [current[2]] if current is not None else []
