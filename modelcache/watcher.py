"""The background pressure watcher: every ``interval`` seconds, the cache evicts (policy order)
while its accounted bytes exceed the budget or the device's free memory is below the reserve."""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Deque, Optional

logger = logging.getLogger("modelcache")


class Watcher:
    """A daemon thread calling ``check()`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, check: Callable[[], int], interval: float) -> None:
        self._check = check
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = threading.Thread(target=self._run, name="modelcache-watcher",
                                                                     daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._check()
            except Exception:  # the watcher must survive a bad reading
                logger.exception("modelcache: pressure check failed")

    def stop(self, timeout: Optional[float]) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


class RuntimeGrowth:
    """Device bytes this process holds beyond the cache's books and beyond what it held at its
    cleanest reading: memory runtimes take on their own as they run (kernel code loaded on first
    use, library state of new threads, arena fragmentation). Found on the H200: with 8 threads
    and sessions made again, 80-160 MiB beyond the books, enough to put the process 7 % over a
    2.2 GiB budget.

    A reading is the process's device bytes (NVML) less the books (room promised to moves in
    flight included, so a move's memory is within them). The floor is the lowest reading taken
    while nothing moves, right after the runtimes gave back what they keep without need (the
    arena shrunk), when the books are exact; the growth is the lowest of the last ``window``
    readings less the floor (a passing spike does not count; what stays does)."""

    def __init__(self, window: int = 3) -> None:
        self.floor: Optional[int] = None
        self._readings: Deque[int] = collections.deque(maxlen=window)

    def add(self, reading: int, clean: bool = False) -> int:
        """Take a reading (bytes); ``clean``: taken right after the runtimes gave back what they
        keep without need. Returns the growth (bytes)."""
        if clean:
            self.floor = reading if self.floor is None else min(self.floor, reading)
        if self.floor is None:
            return 0
        self._readings.append(reading)
        return max(0, min(self._readings) - self.floor)
