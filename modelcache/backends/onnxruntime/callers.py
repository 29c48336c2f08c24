"""Threads that run a shared session themselves instead of handing each run to its runner.

A weights-mode session runs on a thread of its own (its runner): ONNX Runtime's CUDA provider
keeps cuBLAS/cuDNN state for every thread that runs a session, and one thread keeps that state to
one copy. The hand-off costs run time, though: on the H100 a launch-bound model (mobilenet, 2 ms)
ran up to 1.25x slower through the runner than on the caller's thread, which ran it as fast as a
plain session (docs/gpu-results-zoo-2026-11-25.md). With ``caller_threads=N`` the first N threads
that run models of an architecture run them on their own thread; each one's state is measured at
its first run (the process's device growth over that run, with the arena shrunk after it; taken
only at a moment when no other run of the backend is in flight, the runner runs it until then)
and counted with the session's bytes, so the budget still holds. Other threads hand their runs
to the runner. The state goes with the session.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, ContextManager, List, Set, Tuple

from ...devices.base import Charge, DeviceMemory


class CallerThreads:
    """Which threads run one session themselves (at most ``limit``), and the device bytes their
    runtime state takes (``nbytes``, charged on ``memory``)."""

    def __init__(self, limit: int, memory: DeviceMemory, gate: Any, shrinking: Any, owner: str) -> None:
        self.limit = limit
        self._memory, self._gate, self._shrinking, self._owner = memory, gate, shrinking, owner
        self._threads: Set[int] = set()
        self._joining = 0
        self._charges: List[Charge] = []
        self._lock = threading.Lock()
        self.nbytes = 0

    def count(self) -> int:
        """How many threads run the session themselves now."""
        with self._lock:
            return len(self._threads)

    def member(self) -> bool:
        """Whether the calling thread is one of the session's caller threads."""
        return threading.get_ident() in self._threads

    def join(self, fn: Callable[..., Any], args: Tuple[Any, ...]) -> Tuple[bool, Any]:
        """Make the calling thread one of the session's caller threads, if there is a place and
        it may be measured now, by running ``fn(*args)`` on it (its first run, measured). Returns
        (False, None) if the thread must hand the run to the runner instead. Members run without
        it (``OrtModel``, :meth:`member`)."""
        ident = threading.get_ident()
        with self._lock:
            if len(self._threads) + self._joining >= self.limit:
                return False, None
            self._joining += 1
        try:
            # the first run on this thread, alone (a measurement), the arena shrunk after it: what
            # stays is the thread's own state, not the run's working memory. Only when nothing
            # else runs or measures now: a measurement would hold every run of the backend back
            # (a session being made: a second); until then the runner runs it
            if not self._gate.try_write():
                return False, None
            try:
                measured = args[:-1] + (self._shrinking,) if self._shrinking is not None else args
                with self._context():
                    result, charge = self._memory.measure(lambda: fn(*measured),
                                                          expected_bytes=self._memory.thread_overhead_bytes,
                                                          owner=self._owner)
            finally:
                self._gate.end_write()
            with self._lock:
                self._charges.append(charge)
                self.nbytes += charge.nbytes
                self._threads.add(ident)
            return True, result
        finally:
            with self._lock:
                self._joining -= 1

    def _context(self) -> ContextManager[None]:
        """The device's own context for the run (a caller with a context of its own, such as
        ``pycuda.autoinit``'s, gets it back after the run)."""
        return self._memory.device_context()

    def free(self) -> None:
        """The session is gone, and with it every thread's state."""
        with self._lock:
            charges, self._charges = self._charges, []
            self._threads.clear()
            self.nbytes = 0
        for charge in charges:
            charge.free()

