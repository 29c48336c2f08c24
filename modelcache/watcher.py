"""The background pressure watcher: every ``interval`` seconds, the cache evicts (policy order)
while its accounted bytes exceed the budget or the device's free memory is below the reserve."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

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
