"""Closing a cache: draining it, freeing its models, and the files of caches never closed (removed
at interpreter exit)."""
from __future__ import annotations

import atexit
import contextlib
import logging
import weakref
from typing import TYPE_CHECKING, Optional

from ._fileio import remove_tree
from .moves import make_deadline, release_quietly, time_left

if TYPE_CHECKING:  # pragma: no cover
    from .cache import ModelCache

logger = logging.getLogger("modelcache")

#: live caches, whose files are removed at interpreter exit if they were not closed
LIVE: "weakref.WeakSet[ModelCache]" = weakref.WeakSet()


def close(cache: "ModelCache", timeout: Optional[float]) -> None:
    """``ModelCache.close`` (see its docstring)."""
    with cache._cond:
        if cache._closed:
            return
        cache._closed = True
        cache._cond.notify_all()
    deadline = make_deadline(timeout)
    if cache._watcher is not None:
        cache._watcher.stop(time_left(deadline))
    cache._executor.shutdown(wait=False, cancel_futures=True)
    with cache._cond:
        while any(e.leases or e.moving is not None for e in cache._entries.values()):
            left = time_left(deadline)
            if left == 0:
                break
            cache._cond.wait(0.05 if left is None else min(left, 0.05))
        entries = list(cache._entries.values())
        cache._entries.clear()
        for entry in entries:
            entry.removed = True             # a move still in flight frees what it makes
    cache._moves.workers.stop()
    cache._moves.acquirers.stop()
    held = {e.name: e.leases for e in entries if e.leases}
    if held:
        logger.warning("modelcache: closed after %s s with leases still held: %s; their models are freed",
                       timeout, held)
    in_flight = [e for e in entries if e.moving is not None]
    for entry in entries:
        if entry.moving is None and entry.handle is not None and entry.backend is not None:
            release_quietly(entry.backend, entry.handle)
            entry.handle = None
    if in_flight:                            # their backends, device and files are still in use
        logger.warning("modelcache: closed with moves still in flight (%s); they free what they make",
                       sorted(e.name for e in in_flight))
        return
    for backend in cache._backends.values():
        with contextlib.suppress(Exception):
            backend.close()
    remove_tree(cache._disk_space)
    if cache._owns_monitor:
        cache.monitor.close()


def remove_files(cache: "ModelCache") -> None:
    """A cache not closed: remove its disk folder and its backends' files (in RAM or scratch)."""
    for backend in list(cache._backends.values()):
        backend.remove_files()
    remove_tree(cache._disk_space)


@atexit.register
def _remove_files_at_exit() -> None:
    for cache in list(LIVE):
        if not cache._closed:
            remove_files(cache)
