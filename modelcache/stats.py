"""Counters and duration samples behind ``ModelCache.stats()`` (a flat dict with dotted keys)."""
from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Deque, Dict, Union

Number = Union[int, float]


class Samples:
    """The most recent ``maxlen`` durations (seconds) of one kind, summarised as percentiles."""

    def __init__(self, maxlen: int = 4096) -> None:
        self._values: Deque[float] = deque(maxlen=maxlen)
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self._values.append(seconds)
        self.count += 1
        self.total += seconds

    def summary(self, prefix: str) -> Dict[str, Number]:
        values = sorted(self._values)
        out: Dict[str, Number] = {f"{prefix}.count": self.count, f"{prefix}.seconds.total": self.total}
        if values:
            for p in (50, 95, 99):
                out[f"{prefix}.seconds.p{p}"] = values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]
            out[f"{prefix}.seconds.max"] = values[-1]
        return out


class Recorder:
    """Thread-safe counters (``incr``) and duration samples (``observe``)."""

    KINDS = ("load", "swap_in", "swap_out", "to_disk", "from_disk")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: Counter = Counter()
        self.samples = {kind: Samples() for kind in self.KINDS}

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
