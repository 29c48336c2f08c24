"""Weights mode: the graph takes its weights as inputs; one long-lived session per architecture
serves every model of it, and a swap-in is one copy of the weights into a device buffer.

A model's first swap-in prepares it on the device (``optimize.py``): ONNX Runtime optimizes the
graph for the device with the weights as constants, the optimized graph's weights become graph
inputs, and the result is checked against the plain session there; a model whose check fails runs
in session mode instead (``mode="auto"``). Models whose prepared graphs match up to tensor sizes
share one :class:`SessionGroup` (one session, created on the group's first swap-in and measured,
with its runner). The device tier is a buffer filled by an asynchronous copy from the host block,
bound to the session's inputs once per residency. Swap-out frees the buffer; the session stays
while any member keeps the group, and its bytes are carried in the accounting by the group's
first member.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ...devices.host import align
from ...tiers import Tier
from ...errors import InvalidModelError, ModelCacheError
from . import graph, optimize
from .graph import group_key
from .handle import Mode, OrtHandle
from .callers import CallerThreads
from .model import OrtModel

logger = logging.getLogger("modelcache")

#: default of the ``caller_threads`` option (see callers.py)
CALLER_THREADS = 1
#: how far a shrink's measured release may fall short of what it frees in the books (the
#: process's reading moves in pages of the driver's allocations)
ARENA_SLACK_BYTES = 4 << 20
#: shrinks a reclaim measures while sessions going meanwhile blur the reading (then it keeps counting)
RECLAIM_ATTEMPTS = 3


def caller_threads(options: Dict[str, Any]) -> int:
    """How many threads may run a session of these options themselves (``caller_threads``)."""
    return int(options.get("caller_threads", CALLER_THREADS))


class SessionGroup:
    """One device session shared by every weights-mode model whose rewritten graph is the same up
    to tensor sizes (same operators, names and small constants; options equal).

    ONNX Runtime's CUDA provider keeps memory per session (cuBLAS/cuDNN handles and workspaces,
    arena: about 200 MiB on an H100 once it has run), so N models of one architecture pay it
    once. ``nbytes`` is that figure, measured when the session was created and first run. The
    first member (the owner) carries it in the cache's accounting; the group and its session
    (and its runner) go when the last member leaves."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.lock = threading.Lock()    # held while the session is created: one creation per group
        self.session: Any = None
        self.runner: Any = None         # devices.Runner: where the session's calls run
        self.charge: Any = None         # devices.Charge for the session's device bytes
        self.nbytes = 0
        self.members: List[OrtHandle] = []
        self.pending = 0                # swap-ins joining it right now (keeps it from being dropped)
        self.warmup_error: Optional[str] = None
        self.working_bytes = 0          # device bytes one run takes (measured; see kept_bytes)
        self.create_seconds = 0.0       # what making the session again would cost (measured)
        # device bytes its creation took briefly beyond what it keeps (the first run's algorithm
        # search, measured at the first creation): a creation again plans for them
        self.peak_bytes = 0
        self.callers: Optional[CallerThreads] = None   # threads that run it themselves (caller_threads)
        # its runs' working memory is (or may still be) in the shared arena: set at each swap-in of
        # a member, cleared when a shrink with no member on the device gave it back (WeightsMode.reclaim)
        self.retained = False
        # a shrink gave back less than this working memory: still counted, and not asked for again
        # until it runs again or a session goes (whose constants may have held the arena's regions)
        self.arena_kept = False
        self.joins = 0                  # swap-ins of its members so far (see WeightsMode.reclaim)

    def device_bytes(self) -> int:
        """The session's device bytes, with the state of the threads that run it themselves."""
        return self.nbytes + (self.callers.nbytes if self.callers is not None else 0)

    def runs_working_bytes(self) -> int:
        """Working memory the session's runs can hold at once: its runner's run and one on each
        caller thread (see callers.py)."""
        return self.working_bytes * (1 + (self.callers.limit if self.callers is not None else 0))

    def resident(self) -> bool:
        return any(m.tier is Tier.DEVICE for m in list(self.members))

    def kept_bytes(self) -> int:
        """What the group keeps on the device while its session exists: the session, and its runs'
        working memory while the shared arena may keep it (from a member's swap-in until a shrink
        with none on the device gave it back: ``WeightsMode.reclaim``, or the session goes)."""
        return self.device_bytes() + (self.runs_working_bytes() if self.retained else 0)


class WeightsMode(Mode):
    name = "weights"

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self._groups: Dict[str, SessionGroup] = {}     # shared sessions by graph key
        self._lock = threading.Lock()
        self._session_bytes_seen = 0
        self._known: Dict[str, Tuple[int, int, int]] = {}   # group key -> (session, working, peak) bytes measured
        self.sessions_created = 0
        self._drops = 0                 # sessions freed so far (see reclaim)

    # moves -------------------------------------------------------------------------------------
    def to_device(self, handle: OrtHandle) -> None:
        """Copy the weights into a device buffer, then join the handle's session group (creating
        its session on the first swap-in of that architecture). The model's first swap-in
        prepares and checks it first (see the module docstring)."""
        if not handle.prepared:
            self._first_swap_in(handle)
            return
        assert handle.block is not None
        memory, gate = self.backend.memory, self.backend.sessions.gate
        nbytes = handle.weights_nbytes
        with gate.read():               # allocations never overlap a measurement
            buffer = memory.allocate(nbytes, owner=handle.name)
        try:
            # asynchronous, in this thread's stream order (a free is ordered after it too)
            memory.copy_to_device(buffer.ptr, handle.block.ptr, nbytes)
            # a session made now runs on the weights: they must have arrived first
            group = self._join(handle, buffer.ptr, before_create=memory.synchronize)
        except BaseException:
            with gate.read():
                buffer.free()
            raise
        handle.device_weights = buffer
        handle.device_bytes = nbytes      # plus the group's session if it carries it
        with self._lock:
            group.retained = True         # it runs: the arena keeps its working memory
            group.arena_kept = False
            group.joins += 1
        handle.wrapper = OrtModel(handle.name, group.session, handle.weights, (memory.kind, memory.index), buffer.ptr,
                                  handle.input_names, handle.output_names,
                                  self.backend.sessions.run_options(handle.options), group.runner, gate,
                                  handle.signature, working=(memory, group.working_bytes, group.key),
                                  callers=group.callers, context=memory.device_context)
        try:
            # the weights bound once per residency, on the session's thread, while the copy runs:
            # binding takes their addresses only (about 5 us a weight: 1-2 ms for the zoo's models)
            group.runner.call(handle.wrapper.prime)
        finally:
            memory.synchronize()        # the weights are there before anything runs on or frees them

    def to_host(self, handle: OrtHandle) -> None:
        if handle.device_weights is not None:
            with self.backend.sessions.gate.read():   # no lease, so no run uses the weights
                handle.device_weights.free()
            handle.device_weights = None

    def unpark(self, handle: OrtHandle) -> None:
        """Leave the session group kept on the device for fast swap-ins (its session goes with its
        last member); the next swap-in joins or creates it again."""
        self._leave(handle)

    def disk_payload(self, handle: OrtHandle) -> Tuple[bytes, Optional[Iterable[Any]]]:
        weights = handle.block.array.data[:handle.weights_nbytes] if handle.block is not None else None
        return handle.graph, weights

    def leave_host(self, handle: OrtHandle) -> None:
        self._leave(handle)         # below the host tier nothing stays on the device

    def host_session(self, handle: OrtHandle) -> Any:
        lifted = handle.graph
        if not handle.prepared:     # the original graph's weights as inputs, as it stands
            lifted = graph.as_inputs(graph.onnx_module().load_from_string(handle.graph), handle.weights,
                                     generic=bool(handle.options.get("share_session", True)))
        return self.backend.sessions.create(handle.name, lifted, None, 0, cpu=True, options=handle.options,
                                            weights_as_inputs=True, optimized=handle.optimized)

    def host_model(self, handle: OrtHandle) -> OrtModel:
        return OrtModel(handle.name, handle.host_session, handle.weights, None, handle.block, handle.input_names,
                        handle.output_names, signature=handle.signature)

    def release(self, handle: OrtHandle) -> None:
        if handle.device_weights is not None:
            handle.device_weights.free()
            handle.device_weights = None
        self._leave(handle)

    # accounting --------------------------------------------------------------------------------
    def shared_bytes(self, handle: OrtHandle) -> int:
        """What this handle carries of its group's device memory: all of it (the session and its
        runs' working memory, :meth:`SessionGroup.kept_bytes`) if it is the group's first member,
        on the device or parked; nothing otherwise."""
        group = handle.group
        if group is None:
            return 0
        members = list(group.members)      # a snapshot: others may join or leave
        return group.kept_bytes() if members and members[0] is handle else 0

    def kept_bytes(self, handle: OrtHandle) -> int:
        """The session and its runs' working memory stay when the model leaves the device."""
        return self.shared_bytes(handle)

    def estimated_device_bytes(self, handle: OrtHandle) -> int:
        memory = self.backend.memory
        if not handle.prepared:      # the check on the device runs the plain session too
            return optimize.first_swap_in_bytes(handle.weights_nbytes, self._session_estimate()) \
                + memory.run_overhead_bytes
        group = handle.group or self._groups.get(handle.group_key)
        if group is None or group.session is None:
            known = self._known.get(handle.group_key)       # made before, freed since: as measured then
            if known is not None:
                return handle.weights_nbytes + known[0] + known[1] * (1 + caller_threads(handle.options)) + known[2]
            return handle.weights_nbytes + self._session_estimate() + memory.run_overhead_bytes
        # the group's first member carries its session and working memory, on the device or parked;
        # a swap-in into a group whose working memory went back (reclaimed) counts it again
        again = 0 if group.retained else group.runs_working_bytes()
        return handle.weights_nbytes + (self.shared_bytes(handle) if handle.group is group else 0) + again

    def estimated_host_bytes(self, handle: OrtHandle) -> int:
        return handle.block.nbytes if handle.block is not None else align(handle.weights_nbytes)

    def details(self, handle: OrtHandle) -> Dict[str, Any]:
        group = handle.group
        return {"prepared": handle.prepared, "session_group": handle.group_key[:12],
                "session_shared_by": len(group.members) if group else 0,
                "session_device_bytes": group.nbytes if group else 0,
                "working_bytes": group.working_bytes if group else 0,
                "session_peak_bytes": group.peak_bytes if group else 0,
                "session_warmup_error": group.warmup_error if group else None,
                # threads that run the session themselves (no hand-off to its runner), and their state
                "caller_threads": group.callers.count() if group and group.callers else 0,
                "caller_threads_bytes": group.callers.nbytes if group and group.callers else 0}

    def _retained(self) -> List[SessionGroup]:
        """Groups whose runs' working memory the arena may keep (counted whether or not it does)."""
        with self._lock:
            return self._retained_locked()

    def _retained_locked(self) -> List[SessionGroup]:
        return [g for g in self._groups.values() if g.retained and g.session is not None]

    @staticmethod
    def _asked(group: SessionGroup) -> bool:
        """Of those, one whose working memory a shrink is asked for: no member on the device, and
        no shrink has left it since it last ran."""
        return not group.resident() and not group.arena_kept

    def _reclaimable(self) -> List[SessionGroup]:
        return [g for g in self._retained() if self._asked(g)]

    def soft_bytes(self) -> int:
        """See ``Backend.soft_device_bytes``: not what a shrink has just shown the arena keeps."""
        return sum(g.runs_working_bytes() for g in self._retained() if not g.arena_kept)

    def reclaimable_bytes(self) -> int:
        return sum(g.runs_working_bytes() for g in self._reclaimable())

    def reclaim(self) -> None:
        """Shrink the shared arena: what runs of groups off the device left there goes back to the
        driver, and those groups stop counting it as far as the process's reading fell over the
        shrink (``DeviceMemory.measure_release``), less what groups on the device (which keep
        counting theirs) may have given back: where it fell by less (the arena's regions are held
        by other allocations), the groups whose working memory did not come back keep counting it,
        the smallest cleared first, and are not asked for it again until they run again or a
        session goes (``SessionGroup.arena_kept``). A shrink that failed clears nothing; one not
        seen (no reading, no shared arena) clears every one, as the device cannot tell."""
        for attempt in range(RECLAIM_ATTEMPTS):
            with self._lock:
                live = self._retained_locked()
                parked = [(g, g.joins) for g in live if self._asked(g)]
                resident = sum(g.runs_working_bytes() for g in live if g.resident())
                drops = self._drops
            if not parked:
                return
            try:
                released = self.backend.sessions.shrink_arena()
            except BaseException:
                self._keep(parked)          # nothing known to be given back; not asked again
                raise
            left = None if released is None else released + ARENA_SLACK_BYTES - resident
            with self._lock:
                if left is not None and self._drops != drops and attempt + 1 < RECLAIM_ATTEMPTS:
                    continue    # a session went meanwhile: its frees are in the reading; again
                for group, joins in sorted(parked, key=lambda p: p[0].runs_working_bytes()):
                    if group.joins != joins or group.resident():    # one that came back meanwhile keeps it
                        continue
                    nbytes = group.runs_working_bytes()
                    if left is None or (nbytes <= left and self._drops == drops):
                        group.retained = False
                        left = None if left is None else left - nbytes
                    else:
                        group.arena_kept = True
            return

    def _keep(self, parked: List[Tuple[SessionGroup, int]]) -> None:
        with self._lock:
            for group, joins in parked:
                if group.joins == joins:
                    group.arena_kept = True

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            groups = list(self._groups.values())
            return {"sessions": sum(1 for g in groups if g.session is not None),
                    "sessions.bytes": sum(g.nbytes for g in groups if g.session is not None),
                    "sessions.created": self.sessions_created,
                    "sessions.models": sum(len(g.members) for g in groups)}

    # the first swap-in -------------------------------------------------------------------------
    def _first_swap_in(self, handle: OrtHandle) -> None:
        """Prepare the model on the device and check it (``optimize.py``); on success it is
        resident in weights mode, else it moves to the device in session mode (``mode="auto"``)
        or the move fails (``mode="weights"``)."""
        options, memory = handle.options, self.backend.memory
        share = bool(options.get("share_session", True))
        verify = bool(options.get("verify", True)) or options.get("mode", "auto") == "auto"
        ref: Optional[optimize.Reference] = None
        verdict: Optional[str] = None
        figures: Dict[str, Any] = {}
        original = (handle.graph, list(handle.weights), handle.block, handle.weights_nbytes)
        lifted = None
        try:
            try:
                ref = optimize.reference(self.backend, handle, save=bool(options.get("optimize", True)))
            except ValueError as exc:           # no sample input runs: nothing to compare
                if verify:
                    raise _Rejected(str(exc)) from None
            if verify and ref is not None:
                ref.literal_deviation = optimize.literal_deviation(self.backend, handle, ref)
            lifted = optimize.lift(self.backend, handle, ref, share)
            figures.update(lifted.notes)
            handle.optimized = lifted.optimized
            handle.graph, handle.weights, handle.weights_nbytes = lifted.graph, lifted.weights, lifted.weights_nbytes
            handle.block = lifted.block or handle.block
            handle.group_key = group_key(lifted.graph, options, None if share else handle.name)
            handle.sample_feed = ref.feed if ref is not None else None
            handle.prepared = True
            try:
                self.to_device(handle)
                if verify and ref is not None:
                    group = handle.group
                    assert group is not None and handle.device_weights is not None
                    got = optimize.candidate_outputs(self.backend, handle, lifted, group.session,
                                                     handle.device_weights.ptr, group.runner, ref.feed)
                    verdict, checked = optimize.compare(ref, got, handle.output_names, options, memory.kind)
                    figures.update(checked)
            except ModelCacheError as exc:
                if not isinstance(exc, InvalidModelError):
                    raise
                verdict = f"the rewritten graph fails on ONNX Runtime ({str(exc)[:300]})"
            except Exception as exc:
                verdict = f"the rewritten graph fails on ONNX Runtime ({type(exc).__name__}: {str(exc)[:300]})"
        except _Rejected as exc:
            verdict = str(exc)
        except BaseException:
            self._restore(handle, original, lifted)
            raise
        finally:
            optimize.cleanup(ref)
        handle.check = figures
        if verdict is None:
            if lifted is not None and lifted.block is not None and original[2] is not None:
                self.backend.pool.put(original[2])          # the original weights are not needed any more
            handle.mode_reason = ("requested" if options.get("mode") == "weights" else
                                  f"outputs match the plain session's on {memory.kind}: deviation {figures.get('deviation', 0):.3g} <= "
                                  f"tolerance {figures.get('tolerance', 0):.3g}" if verify else "not checked (verify=False)")
            self.backend.refresh_host_session(handle)
            return
        self._restore(handle, original, lifted)
        if options.get("mode") == "weights":
            raise InvalidModelError(f"mode='weights' cannot be used: {verdict}", model=handle.name)
        self.backend.switch_to_session_mode(handle, f"weights mode rejected: {verdict}")

    def _restore(self, handle: OrtHandle, original: Tuple[bytes, List[Any], Any, int],
                 lifted: Optional[optimize.Lifted]) -> None:
        """Undo a first swap-in: off the device, the original graph and weights back."""
        self._retire_device(handle)
        if lifted is not None and lifted.block is not None and handle.block is lifted.block:
            self.backend.pool.put(lifted.block)
        handle.graph, handle.weights, handle.block, handle.weights_nbytes = original
        handle.group_key, handle.prepared, handle.sample_feed, handle.optimized = "", False, None, False

    def _retire_device(self, handle: OrtHandle) -> None:
        if handle.wrapper is not None:
            handle.wrapper.retire()
            handle.wrapper = None
        self.to_host(handle)
        self._leave(handle)

    # session groups ----------------------------------------------------------------------------
    def _session_estimate(self) -> int:
        """Device bytes a session not yet measured is planned with: the largest measured so far,
        at least the device's own estimate."""
        return max(self._session_bytes_seen, self.backend.memory.session_overhead_bytes)

    def _new_group_bytes(self, key: str) -> int:
        """Device bytes a swap-in adds by creating its group's session: 0 if the session exists,
        else the session estimate."""
        group = self._groups.get(key)
        if group is not None and group.session is not None:
            return 0
        return self._session_estimate()

    def _join(self, handle: OrtHandle, base: int, before_create: Optional[Callable[[], None]] = None) -> SessionGroup:
        """The handle's session group, its session created (and measured, ``before_create`` called
        first) if this is the group's first swap-in; concurrent swap-ins of one group create it once."""
        with self._lock:
            group = handle.group or self._groups.get(handle.group_key)
            if group is None:
                group = self._groups[handle.group_key] = SessionGroup(handle.group_key)
            group.pending += 1
        cleanup = None
        try:
            with group.lock:
                if group.session is None:
                    if before_create is not None:
                        before_create()
                    self._create_session(group, handle, base)
                with self._lock:
                    if handle.group is not group:
                        group.members.append(handle)
                        handle.group = group
            return group
        finally:
            with self._lock:
                group.pending -= 1
                cleanup = self._drop_if_unused(group)
            if cleanup is not None:
                cleanup()

    def _create_session(self, group: SessionGroup, handle: OrtHandle, base: int) -> None:
        """Create the group's session on its own runner and run it once on ``handle``'s weights (so
        the run-time handles and workspaces exist); measure the device memory both took."""
        memory, sessions = self.backend.memory, self.backend.sessions

        def create() -> Any:
            session = sessions.create(handle.name, handle.graph, None, 0, cpu=False, options=handle.options,
                                      weights_as_inputs=True, optimized=handle.optimized)
            group.warmup_error = None
            feed = handle.sample_feed
            if feed is None and handle.sample_inputs is not None:
                feed = {name: np.zeros(shape, dtype) for name, dtype, shape in handle.sample_inputs}
            if feed is not None:
                try:   # the caller is the session's runner: the model runs here, not through it
                    # the arena gives back what the run took: the figure is the session's own, not
                    # working memory (shared by every session's runs)
                    OrtModel(handle.name, session, handle.weights, (memory.kind, memory.index), base,
                             handle.input_names, handle.output_names, sessions.device.shrinking_run_options()
                             ).run(None, feed)
                except Exception as exc:    # e.g. a symbolic dimension that 1 does not suit
                    group.warmup_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            return session

        runner = memory.new_runner(f"ort-{handle.name}")
        start = time.perf_counter()
        known = self._known.get(group.key)
        try:
            if known is not None:
                # made and measured before: charged as measured then, and runs of other models go
                # on meanwhile (a measurement stops them for the whole creation, about a second)
                with sessions.gate.read():
                    charge = memory.charge(known[0], owner=handle.name)
                    try:
                        peak = memory.charge(known[2], owner=handle.name)    # its first run's search, as then
                        try:
                            session = runner.call(create)
                        finally:
                            peak.free()
                    except BaseException:
                        charge.free()
                        raise
                group.working_bytes, group.peak_bytes = known[1], known[2]
            else:
                with sessions.gate.write():   # this backend's own allocations, frees and runs wait meanwhile
                    session, charge, group.peak_bytes = memory.measure_peak(
                        lambda: runner.call(create), expected_bytes=memory.session_overhead_bytes, owner=handle.name)
                    group.working_bytes = self._measure_working(group, session, handle, base, runner)
                    # the warm-up run's own working memory is planned as working memory already
                    group.peak_bytes = max(0, group.peak_bytes - group.working_bytes)
        except BaseException:
            runner.shutdown()
            raise
        group.session, group.runner, group.charge, group.nbytes = session, runner, charge, charge.nbytes
        limit = caller_threads(handle.options)
        if limit > 0:
            group.callers = CallerThreads(limit, memory, sessions.gate, sessions.device.shrinking_run_options(),
                                          owner=handle.name)
        group.create_seconds = time.perf_counter() - start
        with self._lock:
            self._session_bytes_seen = max(self._session_bytes_seen, group.nbytes)
            self.sessions_created += 1

    def _measure_working(self, group: SessionGroup, session: Any, handle: OrtHandle, base: int, runner: Any) -> int:
        """Device bytes one run of the session takes (its working memory, for the sample input):
        the arena's growth over a run after it gave back everything, then given back again.
        Gate held. 0 where the warm-up could not run."""
        memory, sessions = self.backend.memory, self.backend.sessions
        feed = handle.sample_feed
        if feed is None or group.warmup_error is not None:
            return memory.run_overhead_bytes
        model = OrtModel(handle.name, session, handle.weights, (memory.kind, memory.index), base,
                         handle.input_names, handle.output_names)
        _, work = memory.measure(lambda: runner.call(model.run, None, feed),
                                 expected_bytes=memory.run_overhead_bytes, owner=handle.name)
        work.free()                # counted from now on through DeviceMemory.working while runs hold it
        shrink = sessions.device.shrinking_run_options()
        if shrink is not None:
            runner.call(model.run, None, feed, shrink)
        return work.nbytes

    def _leave(self, handle: OrtHandle) -> None:
        """The handle stops using its group's session (unparked, demoted or released); the session
        goes with its last member. The next member in line carries its bytes."""
        with self._lock:
            group, handle.group = handle.group, None
            if group is None:
                return
            if handle in group.members:
                group.members.remove(handle)
            cleanup = self._drop_if_unused(group)
        if cleanup is not None:
            cleanup()

    def _drop_if_unused(self, group: SessionGroup) -> Optional[Callable[[], None]]:
        """Lock held: forget a group nobody uses or joins. Returns what frees its session, to call
        once the lock is released: the session is freed on its runner (where ONNX Runtime keeps
        the thread's CUDA handles), then the runner ends."""
        if group.members or group.pending or self._groups.get(group.key) is not group:
            return None
        del self._groups[group.key]
        if group.session is not None:      # its figures plan the session's next creation
            self._known[group.key] = (group.nbytes, group.working_bytes, group.peak_bytes)
        box = [group.session]
        group.session = None
        runner, group.runner = group.runner, None
        charge, group.charge = group.charge, None
        callers, group.callers = group.callers, None

        def cleanup() -> None:
            if runner is not None:
                try:     # on its runner, where ONNX Runtime keeps the thread's CUDA handles
                    runner.call(self._free_on_runner, box)
                finally:
                    runner.shutdown()
            else:
                box.clear()
            try:    # what its runs left in the shared arena goes back to the driver too
                self.backend.sessions.shrink_arena()
            except Exception:       # pragma: no cover - the arena stays as it was; nothing is lost
                logger.warning("modelcache: shrinking the shared ONNX Runtime arena failed", exc_info=True)
            with self._lock:        # the session's constants may have held regions that others' runs left
                self._drops += 1
                for other in self._groups.values():
                    other.arena_kept = False
            if charge is not None:
                charge.free()
            if callers is not None:
                callers.free()
        return cleanup

    def _free_on_runner(self, box: List[Any]) -> None:
        with self.backend.sessions.gate.read():   # frees never overlap a measurement
            box.clear()


class _Rejected(Exception):
    """The check could not run or found the rewrite wrong (the message says why)."""
