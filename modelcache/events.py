"""What happened to a model, told twice: a line on the ``modelcache`` logger and a call to every
hook registered with :meth:`ModelCache.on` for that kind of event (kinds declared in
:data:`EVENTS`). Both happen outside the cache's lock, after the move committed; a hook that
raises is logged and skipped, never the cache's problem.

Log levels: INFO for loads through the loader and for errors (WARNING), DEBUG for every move
(swap-ins, evictions, demotions, reads back from disk).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .errors import ConfigError
from .sizes import format_bytes

logger = logging.getLogger("modelcache")

#: event kinds: a model loaded onto the host (by its loader, or read back from disk), moved onto
#: the device, moved off it (eviction), moved below the host (demotion), or a move that failed
EVENTS = ("load", "swap_in", "eviction", "demotion", "error")


@dataclass(frozen=True)
class Event:
    """One event. ``nbytes``: the bytes the move took or freed (device bytes for swap-ins and
    evictions, host bytes for loads and demotions); ``seconds``: how long it took."""

    kind: str
    model: str
    source: str                      #: tier before ("unloaded", "disk", "host", "device")
    target: str                      #: tier after
    nbytes: int
    seconds: float
    reason: str = ""                 #: eviction: room, pressure, explicit; demotion: host, explicit; error: what failed
    error: Optional[BaseException] = None


Hook = Callable[[Event], None]


class Events:
    """The hooks of one cache, per kind; registering is thread-safe, emitting takes no lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: Dict[str, Tuple[Hook, ...]] = {kind: () for kind in EVENTS}

    def on(self, kind: str, hook: Hook) -> Callable[[], None]:
        """Call ``hook(event)`` for every event of ``kind``; returns a function that removes it."""
        if kind not in self._hooks:
            raise ConfigError(f"event {kind!r} is unknown; the events are {', '.join(EVENTS)}")
        if not callable(hook):
            raise ConfigError(f"hook={hook!r} must be callable (it gets an Event)")
        with self._lock:
            self._hooks[kind] = self._hooks[kind] + (hook,)

        def remove() -> None:
            with self._lock:
                self._hooks[kind] = tuple(h for h in self._hooks[kind] if h is not hook)
        return remove

    def emit(self, kind: str, model: str, source: object, target: object, nbytes: int, seconds: float,
             reason: str = "", error: Optional[BaseException] = None) -> None:
        """Log the event and call its hooks (never under the cache's lock)."""
        hooks = self._hooks[kind]
        level = _level(kind, str(source))
        if not hooks and not logger.isEnabledFor(level):
            return
        event = Event(kind, model, str(source), str(target), int(nbytes), float(seconds), reason, error)
        if logger.isEnabledFor(level):
            logger.log(level, "%s", describe(event))
        for hook in hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("modelcache: a %r hook raised (ignored)", kind)


def _level(kind: str, source: str) -> int:
    if kind == "error":
        return logging.WARNING
    if kind == "load" and source == "unloaded":
        return logging.INFO
    return logging.DEBUG


def describe(event: Event) -> str:
    """The log line of ``event``: the model, what happened, the bytes and the time."""
    took = f"in {event.seconds * 1e3:.1f} ms" if event.seconds < 1 else f"in {event.seconds:.2f} s"
    size = format_bytes(event.nbytes)
    size += f" ({event.nbytes} B)" if size != f"{event.nbytes} B" else ""
    why = f" ({event.reason})" if event.reason and event.kind != "error" else ""
    if event.kind == "error":
        return f"modelcache: {event.error} (after {event.seconds:.3f} s)"
    if event.kind == "load":
        verb = "loaded" if event.source == "unloaded" else f"read back from {event.source}"
        return f"modelcache: model {event.model!r} {verb}: {size} on the {event.target} {took}"
    verb = {"swap_in": "moved onto the device", "eviction": f"evicted to the {event.target}",
            "demotion": f"demoted to {event.target}"}[event.kind]
    return f"modelcache: model {event.model!r} {verb}{why}: {size} {took}"
