"""Counters and duration samples behind ``ModelCache.stats()``: a flat dict with dotted keys,
declared here (:data:`COUNTERS`, :data:`DURATIONS` and :func:`cache_stats`). Each kind of duration
also feeds a cumulative histogram over :data:`BUCKETS` (:meth:`Recorder.histograms`, what
``modelcache.metrics`` exports to Prometheus)."""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from .tiers import Tier

if TYPE_CHECKING:  # pragma: no cover
    from .cache import ModelCache
    from .ledger import Entry

Number = Union[int, float]


#: upper bounds (seconds, inclusive) of the duration histograms' buckets; the last is +Inf
BUCKETS: Tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                              10.0, 30.0, 60.0, float("inf"))


class Histogram(NamedTuple):
    """Durations of one kind since the cache was made (never windowed, so replicas' add up)."""

    buckets: List[Tuple[float, int]]   #: (upper bound in seconds, durations <= it): cumulative, ends at +Inf
    sum: float                         #: seconds, all durations together
    count: int  # type: ignore[assignment]  #: durations observed (the +Inf bucket's count; shadows tuple.count)


class Samples:
    """The most recent ``maxlen`` durations (seconds) of one kind, summarised as percentiles, and
    every duration since it was made counted in :data:`BUCKETS`."""

    def __init__(self, maxlen: int = 4096) -> None:
        self._values: Deque[float] = deque(maxlen=maxlen)
        self._buckets = [0] * len(BUCKETS)     # per bucket, not cumulative
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self._values.append(seconds)
        self._buckets[min(bisect.bisect_left(BUCKETS, seconds), len(BUCKETS) - 1)] += 1
        self.count += 1
        self.total += seconds

    def histogram(self) -> Histogram:
        """The cumulative bucket counts, sum and count of every duration added."""
        buckets, running = [], 0
        for bound, n in zip(BUCKETS, self._buckets):
            running += n
            buckets.append((bound, running))
        return Histogram(buckets, self.total, self.count)

    def summary(self, prefix: str) -> Dict[str, Number]:
        values = sorted(self._values)
        out: Dict[str, Number] = {f"{prefix}.count": self.count, f"{prefix}.seconds.total": self.total}
        if values:
            for p in (50, 95, 99):
                out[f"{prefix}.seconds.p{p}"] = values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]
            out[f"{prefix}.seconds.max"] = values[-1]
        return out


#: event counters, reported as 0 until they happen (``device.monitor_errors``: device readings that
#: raised, whose figures ``stats()`` then leaves out)
COUNTERS = ("loads", "load_errors", "evictions", "evictions.room", "evictions.pressure", "evictions.explicit",
            "demotions.disk", "demotions.unloaded", "waits.room", "errors.busy", "errors.move", "errors.disk",
            "host_serves", "unparks", "device.monitor_errors")
#: kinds of timed moves: each gives ``KIND.count``, ``KIND.seconds.total`` and ``KIND.seconds.p50|p95|p99|max``
DURATIONS = ("load", "swap_in", "swap_out", "to_disk", "from_disk")


class Recorder:
    """Thread-safe counters (``incr``) and duration samples (``observe``)."""

    KINDS = DURATIONS

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.samples = {kind: Samples() for kind in self.KINDS}
        #: the last failed device reading, as ``"ExceptionType: message"`` (kept after recovery), or None
        self.monitor_error: Optional[str] = None

    def monitor_failed(self, exc: BaseException) -> None:
        """Count a device reading that raised ``exc`` (``device.monitor_errors``) and keep it."""
        with self._lock:
            self.counters["device.monitor_errors"] += 1
            self.monitor_error = f"{type(exc).__name__}: {exc}"

    def incr(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def observe(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.samples[kind].add(seconds)

    def snapshot(self) -> Dict[str, Number]:
        with self._lock:
            out: Dict[str, Number] = dict(self.counters)
            for kind, samples in self.samples.items():
                out.update(samples.summary(kind))
            return out

    def histograms(self) -> Dict[str, Histogram]:
        """Each kind of :data:`DURATIONS`' histogram since the cache was made (seconds)."""
        with self._lock:
            return {kind: samples.histogram() for kind, samples in self.samples.items()}


def cache_stats(record: Recorder, entries: Sequence["Entry"], hits: int, misses: int,
                accounted_bytes: int) -> Dict[str, Number]:
    """The entries' part of ``ModelCache.stats()`` (the cache adds the device's readings and its
    budgets): counters, durations, hits, tiers, leases and bytes."""
    out: Dict[str, Number] = {key: 0 for key in COUNTERS}
    out.update(record.snapshot())
    out["hits"], out["misses"] = hits, misses
    out["hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
    out["models"] = len(entries)
    for tier in Tier:
        out[f"models.{tier}"] = sum(1 for e in entries if e.tier is tier)
    out["leases.active"] = sum(e.leases for e in entries)
    out["device.bytes"] = sum(e.device_bytes + e.parked_bytes for e in entries)
    out["device.parked_bytes"] = sum(e.parked_bytes for e in entries)
    out["device.accounted_bytes"] = accounted_bytes
    out["host.bytes"] = sum(e.host_bytes for e in entries)
    return out


def stats_of(cache: "ModelCache") -> Dict[str, Number]:
    """``ModelCache.stats()``: the entries' figures, the device's readings and budgets, and each
    backend's own under its name. A device reading that raises is left out (``device.total_bytes``,
    ``free_bytes``, ``used_bytes``, ``process_bytes``; ``device.working_bytes``) and counted in
    ``device.monitor_errors``; it never makes this raise."""
    record = cache._record
    device: Dict[str, Number] = {}
    try:
        reading = cache.monitor.reading()
    except Exception as exc:
        record.monitor_failed(exc)
    else:
        device.update({"device.total_bytes": reading.total_bytes, "device.free_bytes": reading.free_bytes,
                       "device.used_bytes": reading.used_bytes})
        if reading.process_bytes is not None:
            device["device.process_bytes"] = reading.process_bytes
    try:
        device["device.working_bytes"] = cache.monitor.memory.working_bytes()
    except Exception as exc:
        record.monitor_failed(exc)
    with cache._cond:
        entries, backends = list(cache._entries.values()), list(cache._backends.values())
        out = cache_stats(record, entries, cache._hits, cache._misses, cache._ledger.accounted_bytes())
        out["device.runtime_bytes"] = cache._ledger.runtime_bytes
    out.update({"device.budget_bytes": cache.device_budget_bytes, "device.reserve_bytes": cache.reserve_bytes,
                "host.budget_bytes": cache.host_budget_bytes})
    out.update(device)
    for backend in backends:
        for key, value in backend.stats().items():
            out[f"{backend.name}.{key}"] = value
    return out


def status_of(cache: "ModelCache") -> Dict[str, Any]:
    """``ModelCache.status()``: stats and every entry, JSON-ready; ``monitor_error`` is the last
    failed device reading (``"ExceptionType: message"``, kept after the monitor recovers) or None."""
    entries = []
    for info in cache.entries():
        row = {k: getattr(info, k) for k in ("name", "device_bytes", "host_bytes", "disk_path", "hits",
                                              "misses", "loads", "leases", "last_used", "backend", "pinned")}
        row.update(tier=str(info.tier), mode=info.details.get("mode"))
        entries.append(row)
    stats = cache.stats()
    return {"time": time.time(), "device": cache.device, "policy": cache.policy.name, "stats": stats,
            "monitor_error": cache._record.monitor_error, "entries": entries}
