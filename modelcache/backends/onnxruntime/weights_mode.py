"""Weights mode: the graph takes its weights as inputs; one long-lived session per architecture
serves every model of it, and a swap-in is one copy of the weights into a device buffer.

The graph is rewritten so the weights are graph inputs (``graph.as_inputs``). Models whose
rewritten graphs match up to tensor sizes share one :class:`SessionGroup` (one session, created on
the group's first swap-in and measured, with its runner thread). The device tier is a buffer
filled by an asynchronous copy from the host block, bound to the session's inputs through
IOBinding. Swap-out frees the buffer; the session stays while any member keeps the group, and
its bytes are carried in the accounting by the group's first member.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ...devices.host import align
from .graph import group_key
from .handle import Mode, OrtHandle
from .model import OrtModel


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


class WeightsMode(Mode):
    name = "weights"

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self._groups: Dict[str, SessionGroup] = {}     # shared sessions by graph key
        self._lock = threading.Lock()
        self._session_bytes_seen = 0
        self.sessions_created = 0

    # moves -------------------------------------------------------------------------------------
    def prepare(self, handle: OrtHandle) -> None:
        """Models with the same rewritten graph (and session options) share a session group."""
        if not handle.group_key:
            share = bool(handle.options.get("share_session", True))
            handle.group_key = group_key(handle.graph, handle.options, None if share else handle.name)

    def to_device(self, handle: OrtHandle) -> None:
        """Copy the weights into a device buffer, then join the handle's session group (creating
        its session on the first swap-in of that architecture)."""
        assert handle.block is not None
        memory, gate = self.backend.memory, self.backend.sessions.gate
        nbytes = handle.weights_nbytes
        with gate.read():               # allocations never overlap a measurement
            buffer = memory.allocate(nbytes, owner=handle.name)
        try:
            memory.copy_to_device(buffer.ptr, handle.block.ptr, nbytes)
            memory.synchronize()
            group = self._join(handle, buffer.ptr)
        except BaseException:
            with gate.read():
                buffer.free()
            raise
        handle.device_weights = buffer
        handle.device_bytes = nbytes      # plus the group's session if it carries it
        handle.wrapper = OrtModel(handle.name, group.session, handle.weights, (memory.kind, memory.index), buffer.ptr,
                                  handle.input_names, handle.output_names,
                                  self.backend.sessions.run_options(handle.options), group.runner, gate,
                                  handle.signature)

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
        weights = memoryview(handle.block.array)[:handle.weights_nbytes] if handle.block is not None else None
        return handle.graph, weights

    def leave_host(self, handle: OrtHandle) -> None:
        self._leave(handle)         # below the host tier nothing stays on the device

    def host_session(self, handle: OrtHandle) -> Any:
        return self.backend.sessions.create(handle.name, handle.graph, None, 0, cpu=True, options=handle.options,
                                            weights_as_inputs=True)

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
        """The group's session bytes if this handle carries them (it is the group's owner)."""
        group = handle.group
        members = list(group.members) if group is not None else []   # a snapshot: others may join or leave
        return group.nbytes if group is not None and members and members[0] is handle else 0

    def estimated_device_bytes(self, handle: OrtHandle) -> int:
        session = self.shared_bytes(handle) if handle.group is not None else self._new_group_bytes(handle.group_key)
        return handle.weights_nbytes + session

    def estimated_host_bytes(self, handle: OrtHandle) -> int:
        return handle.block.nbytes if handle.block is not None else align(handle.weights_nbytes)

    def unpark_frees(self, handle: OrtHandle) -> int:
        group = handle.group
        return group.nbytes if group is not None and list(group.members) == [handle] else 0

    def details(self, handle: OrtHandle) -> Dict[str, Any]:
        group = handle.group
        return {"session_group": handle.group_key[:12], "session_shared_by": len(group.members) if group else 0,
                "session_device_bytes": group.nbytes if group else 0,
                "session_warmup_error": group.warmup_error if group else None}

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            groups = list(self._groups.values())
            return {"sessions": sum(1 for g in groups if g.session is not None),
                    "sessions.bytes": sum(g.nbytes for g in groups if g.session is not None),
                    "sessions.created": self.sessions_created,
                    "sessions.models": sum(len(g.members) for g in groups)}

    # session groups ----------------------------------------------------------------------------
    def _new_group_bytes(self, key: str) -> int:
        """Device bytes a swap-in adds by creating its group's session: 0 if the session exists,
        else the largest session measured so far."""
        group = self._groups.get(key)
        if group is not None and group.session is not None:
            return 0
        return self._session_bytes_seen

    def _join(self, handle: OrtHandle, base: int) -> SessionGroup:
        """The handle's session group, its session created (and measured) if this is the group's
        first swap-in; concurrent swap-ins of one group create it once."""
        with self._lock:
            group = handle.group or self._groups.get(handle.group_key)
            if group is None:
                group = self._groups[handle.group_key] = SessionGroup(handle.group_key)
            group.pending += 1
        cleanup = None
        try:
            with group.lock:
                if group.session is None:
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
                                      weights_as_inputs=True)
            group.warmup_error = None
            if handle.sample_inputs is not None:
                feed = {name: np.zeros(shape, dtype) for name, dtype, shape in handle.sample_inputs}
                try:   # the caller is the session's runner: the model runs here, not through it
                    OrtModel(handle.name, session, handle.weights, (memory.kind, memory.index), base,
                             handle.input_names, handle.output_names).run(None, feed)
                except Exception as exc:    # e.g. a symbolic dimension that 1 does not suit
                    group.warmup_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            return session

        runner = memory.new_runner(f"ort-{handle.name}")
        try:
            with sessions.gate.write():   # this backend's own allocations and frees wait meanwhile
                session, charge = memory.measure(lambda: runner.call(create),
                                                 expected_bytes=memory.session_overhead_bytes, owner=handle.name)
        except BaseException:
            runner.shutdown()
            raise
        group.session, group.runner, group.charge, group.nbytes = session, runner, charge, charge.nbytes
        with self._lock:
            self._session_bytes_seen = max(self._session_bytes_seen, group.nbytes)
            self.sessions_created += 1

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
        box = [group.session]
        group.session = None
        runner, group.runner = group.runner, None
        charge, group.charge = group.charge, None

        def cleanup() -> None:
            if charge is not None:
                charge.free()
            if runner is not None:
                runner.submit(self._free_on_runner, box)
                runner.shutdown()
            else:
                box.clear()
        return cleanup

    def _free_on_runner(self, box: List[Any]) -> None:
        with self.backend.sessions.gate.read():   # frees never overlap a measurement
            box.clear()
