"""Session mode: the seed's recipe (§14), done well. The device tier is a session on the device;
the host tier keeps the model as files in RAM-backed storage.

The host tier is a model file and a weights file (in /dev/shm where it has room): ONNX Runtime
maps external data from a file, the fastest way it creates a session. The first device session
saves an optimized graph that later ones load with graph optimizations off. The session's own
device memory is measured when it is created (``DeviceMemory.measure``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, Iterable, Optional, Tuple

from ..._fileio import remove_quietly
from .graph import WEIGHTS_FILE, onnx_module
from .handle import Mode, OrtHandle
from .model import OrtModel


class SessionMode(Mode):
    name = "session"

    def prepare(self, handle: OrtHandle) -> None:
        """Write the host files; the host block goes back to the pool."""
        folder = tempfile.mkdtemp(prefix="model-", dir=self.backend.sessions.host_files_dir(handle.weights_nbytes))
        try:
            with open(os.path.join(folder, "model.onnx"), "wb") as f:
                f.write(handle.graph)
            if handle.block is not None:
                with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
                    f.write(handle.block.array.data[:handle.weights_nbytes])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        handle.host_dir = folder
        handle.host_in_ram = self.backend.sessions.in_ram(folder)
        handle.graph = b""
        if handle.block is not None:
            self.backend.pool.put(handle.block)
            handle.block = None
        handle.host_bytes = handle.weights_nbytes if handle.host_in_ram else 0

    def to_device(self, handle: OrtHandle) -> None:
        """A session on the device from the host files; the first one saves an optimized graph
        that later ones load with optimizations off."""
        memory, sessions = self.backend.memory, self.backend.sessions
        nbytes = handle.weights_nbytes
        save = None if handle.optimized else os.path.join(handle.host_dir or "", "optimized.onnx")
        runner = self._runner(handle)

        def create() -> Any:
            return sessions.create(handle.name, handle.model_path(), None, 0, cpu=False, options=handle.options,
                                   optimized=handle.optimized, save_optimized=save)
        try:
            with sessions.gate.write():   # this backend's own allocations and frees wait meanwhile
                session, charge = memory.measure(lambda: runner.call(create),
                                                 expected_bytes=nbytes + memory.session_overhead_bytes,
                                                 owner=handle.name)
        finally:
            if save is not None:
                self._adopt_optimized(handle, save)
        handle.session, handle.charge = session, charge
        handle.session_device_bytes = max(0, charge.nbytes - nbytes)
        handle.device_bytes = handle.weights_nbytes + handle.session_device_bytes
        handle.wrapper = OrtModel(handle.name, session, [], None, None, handle.input_names, handle.output_names,
                                  sessions.run_options(handle.options), runner, sessions.gate,
                                  context=self.backend.memory.device_context)

    def to_host(self, handle: OrtHandle) -> None:
        handle.session = None              # the last reference: its device memory goes now
        if handle.charge is not None:
            handle.charge.free()
            handle.charge = None

    def disk_payload(self, handle: OrtHandle) -> Tuple[bytes, Optional[Iterable[Any]]]:
        with open(handle.model_path(), "rb") as f:
            graph = f.read()
        return graph, _file_chunks(os.path.join(handle.host_dir or "", WEIGHTS_FILE))

    def leave_host(self, handle: OrtHandle) -> None:
        self._remove_host_files(handle)

    def host_session(self, handle: OrtHandle) -> Any:
        return self.backend.sessions.create(handle.name, handle.model_path(), None, 0, cpu=True,
                                            options=handle.options, optimized=handle.optimized_for == "cpu")

    def host_model(self, handle: OrtHandle) -> OrtModel:
        return OrtModel(handle.name, handle.host_session, [], None, None, handle.input_names, handle.output_names)

    def release(self, handle: OrtHandle) -> None:
        self.to_host(handle)
        self._remove_host_files(handle)
        if handle.runner is not None:
            handle.runner.shutdown()
            handle.runner = None

    # accounting --------------------------------------------------------------------------------
    def estimated_device_bytes(self, handle: OrtHandle) -> int:
        return handle.device_bytes or (handle.weights_nbytes + handle.session_device_bytes)

    def estimated_host_bytes(self, handle: OrtHandle) -> int:
        return handle.weights_nbytes

    def details(self, handle: OrtHandle) -> Dict[str, Any]:
        return {"session_device_bytes": handle.session_device_bytes}

    # helpers -----------------------------------------------------------------------------------
    def _runner(self, handle: OrtHandle) -> Any:
        """The model's own runner for its sessions (see ``DeviceMemory.new_runner``)."""
        if handle.runner is None:
            handle.runner = self.backend.memory.new_runner(f"ort-{handle.name}")
        return handle.runner

    def _adopt_optimized(self, handle: OrtHandle, path: str) -> None:
        """Make the optimized graph the first device session saved the host files' model. Skipped
        (the plain graph kept, optimizations on) if it was not saved."""
        data_path = path + ".data"
        folder = handle.host_dir
        try:
            if folder is None or not os.path.exists(path):
                return
            proto = onnx_module().load(path, load_external_data=False)
            location = os.path.basename(data_path)
            for init in proto.graph.initializer:
                for entry in init.external_data:
                    if entry.key == "location" and entry.value == location:
                        entry.value = WEIGHTS_FILE
            with open(os.path.join(folder, "model.onnx.new"), "wb") as f:
                f.write(proto.SerializeToString())
            if os.path.exists(data_path):
                os.replace(data_path, os.path.join(folder, WEIGHTS_FILE))
                handle.weights_nbytes = os.path.getsize(os.path.join(folder, WEIGHTS_FILE))
            os.replace(os.path.join(folder, "model.onnx.new"), handle.model_path())
            handle.optimized = True
            handle.optimized_for = self.backend.memory.kind
            handle.host_bytes = handle.weights_nbytes if handle.host_in_ram else 0
        except Exception:
            handle.optimized = False
        finally:
            remove_quietly(path)
            remove_quietly(data_path)

    @staticmethod
    def _remove_host_files(handle: OrtHandle) -> None:
        if handle.host_dir is not None:
            shutil.rmtree(handle.host_dir, ignore_errors=True)
            handle.host_dir = None


def _file_chunks(path: str, chunk: int = 64 << 20) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                return
            yield data
