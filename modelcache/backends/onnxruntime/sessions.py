"""Creating ONNX Runtime sessions for one backend: the execution providers of the device the cache
runs on, weights handed over from host memory, saved optimized graphs, files in RAM-backed
storage, and the gate that keeps device-memory measurements apart from runs.

Providers are chosen by the device type its memory shows to runtimes (``DeviceMemory.kind``):
the CUDA provider on a GPU, the CPU provider on a simulated device. A session that must run on
the CPU (a host-tier session, a verification run) asks for it with ``cpu=True``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Optional, Set

import numpy as np

from ..._fileio import reclaim_stale
from ..._optional import require
from ...devices.base import DeviceMemory
from ...devices.host import HostBlock
from ...errors import InvalidModelError, ModelCacheError
from .graph import MiB, WEIGHTS_FILE

_env_arenas: Set[int] = set()         # devices whose shared CUDA arena is registered with ONNX Runtime
_env_arenas_lock = threading.Lock()
arena_errors: Dict[int, str] = {}  # device -> why ONNX Runtime refused a shared arena
#: folders of files in RAM and scratch: modelcache-ort-<pid>-<random> (ended processes' are reclaimed)
FOLDER_PREFIX = "modelcache-ort-"


def ort_module() -> Any:
    return require("onnxruntime", "the onnxruntime backend",
                   "pip install 'modelcache[onnxruntime-gpu]' on a GPU machine, 'modelcache[onnxruntime]' elsewhere")


class CpuProvider:
    """ONNX Runtime's CPU execution provider."""

    #: weights mode stores matrix-multiplication weights transposed (``graph.transpose_matmul_weights``):
    #: this provider re-packs weights that are graph inputs on every run, at less cost that way
    transposed_matmul_weights = True

    def providers(self, options: Dict[str, Any]) -> List[Any]:
        return ["CPUExecutionProvider"]

    def configure(self, so: Any, options: Dict[str, Any], weights_as_inputs: bool = False) -> None:
        """Provider-specific session settings."""

    def run_options(self, options: Dict[str, Any]) -> Any:
        """Default RunOptions for the model's runs (None: ONNX Runtime's defaults)."""
        return None

    def shrinking_run_options(self) -> Any:
        """RunOptions for a run after which the device arena gives back what the run took (None:
        the provider keeps no arena on a device)."""
        return None

    def arena_shrinker(self) -> Any:
        """A one-node session on the shared device arena whose run (with
        :meth:`shrinking_run_options`) gives the arena's free memory back to the driver; None
        where there is no shared arena."""
        return None


class CudaProvider(CpuProvider):
    """ONNX Runtime's CUDA execution provider on one device, with the CPU provider as fallback."""

    transposed_matmul_weights = False     # the graph stays as ONNX Runtime optimized it for CUDA

    def __init__(self, device: int) -> None:
        self.device = device

    def providers(self, options: Dict[str, Any]) -> List[Any]:
        ort = ort_module()
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:
                pass
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelCacheError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                                  f"(providers: {ort.get_available_providers()}); install onnxruntime-gpu")
        cuda = {"device_id": str(self.device), "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "0",
                "do_copy_in_default_stream": "1", "use_ep_level_unified_stream": "1"}
        cuda.update({k: str(v) for k, v in (options.get("provider_options") or {}).items()})
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]

    def configure(self, so: Any, options: Dict[str, Any], weights_as_inputs: bool = False) -> None:
        # only sessions of lifted graphs (no weights of their own) use the shared arena: a plain
        # session's initializers would stay in it after the session is gone
        if weights_as_inputs and options.get("shared_arena", True) and self._shared_arena():
            so.add_session_config_entry("session.use_env_allocators", "1")
            # the session's own constants (small initializers left in the graph) outside the arena:
            # allocated between runs' working memory, they kept whole arena regions from going
            # back to the driver when it is shrunk (a shrink returned 6 of 152 MiB on the H200)
            so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")

    def run_options(self, options: Dict[str, Any]) -> Any:
        """With ``shrink_arena`` (default False; no effect measured on the H100), arenas give back
        what a run allocated once it ends."""
        return self.shrinking_run_options() if options.get("shrink_arena", False) else None

    def shrinking_run_options(self) -> Any:
        run_options = ort_module().RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{self.device}")
        return run_options

    def arena_shrinker(self) -> Any:
        if self.device not in _env_arenas:
            return None
        onnx = require("onnx", "the onnxruntime backend", "pip install onnx")
        helper = onnx.helper
        node = helper.make_node("Identity", ["x"], ["y"])
        proto = helper.make_model(helper.make_graph(
            [node], "modelcache-arena-shrinker", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
            opset_imports=[helper.make_opsetid("", 13)])
        proto.ir_version = min(proto.ir_version, 8)
        ort = ort_module()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.configure(so, {}, weights_as_inputs=True)
        return ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=self.providers({}))

    def _shared_arena(self) -> bool:
        """One CUDA arena shared by every session of the process (registered once per device with
        ``create_and_register_allocator_v2``: the first version takes CPU devices only), so N
        cached models do not each keep an arena for their working memory. False if ONNX Runtime
        refuses (the reason is kept in :data:`arena_errors`)."""
        with _env_arenas_lock:
            if self.device in _env_arenas:
                return True
            ort = ort_module()
            try:
                info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, self.device,
                                         ort.OrtMemType.DEFAULT)
                cfg = ort.OrtArenaCfg({"max_mem": 0, "arena_extend_strategy": 1, "initial_chunk_size_bytes": -1,
                                       "max_dead_bytes_per_chunk": -1, "initial_growth_chunk_size_bytes": -1})
                ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, {"device_id": str(self.device)},
                                                     cfg)
            except Exception as exc:
                arena_errors[self.device] = f"{type(exc).__name__}: {str(exc)[:300]}"
                return False
            _env_arenas.add(self.device)
            return True


#: the provider for each device type a DeviceMemory shows to runtimes
PROVIDERS = {"cpu": lambda device: CpuProvider(), "cuda": CudaProvider}


class Gate:
    """A readers/writer lock preferring the writer: any number of runs and allocations at once, or
    one memory measurement alone (waiting readers let a waiting measurement go first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    def acquire_read(self) -> None:
        """Begin reading (end it with :meth:`release_read`): the hot path of every run (the
        plain lock's own context manager, not the condition's Python one)."""
        with self._lock:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._lock:
            self._readers -= 1
            if not self._readers and self._writers_waiting:    # only a writer waits for readers
                self._cond.notify_all()

    def try_write(self) -> bool:
        """Begin a measurement if nothing runs or measures now (no waiting); end it with
        :meth:`end_write`."""
        with self._cond:
            if self._writing or self._readers or self._writers_waiting:
                return False
            self._writing = True
            return True

    def end_write(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class Sessions:
    """Makes the sessions of one backend (see the module docstring)."""

    def __init__(self, memory: DeviceMemory, disk_dir: Optional[str]) -> None:
        for folder in ("/dev/shm", disk_dir or tempfile.gettempdir()):   # what ended processes left
            reclaim_stale(folder, FOLDER_PREFIX)
        self.memory = memory
        self.device = PROVIDERS[memory.kind](memory.index)
        self.cpu = CpuProvider()
        self.gate = Gate()       # device allocations and runs (shared) vs a memory measurement (exclusive)
        self._disk_dir = disk_dir
        self._shrinker: Any = None          # (runner, session) of shrink_arena, made at its first call
        self._scratch: Optional[str] = None
        self._shm: Optional[str] = None
        self._lock = threading.Lock()

    def create(self, name: str, graph: Any, block: Optional[HostBlock], nbytes: int, *, cpu: bool,
               options: Dict[str, Any], weights_as_inputs: bool = False, optimized: bool = False,
               save_optimized: Optional[str] = None, save_min_bytes: Optional[int] = None) -> Any:
        """An InferenceSession of ``graph`` (bytes or a path); external weights come from ``block``
        in memory. ``cpu``: on the CPU provider whatever the device. ``optimized``: the graph is
        already optimized (ONNX Runtime's optimizations off). ``save_optimized``: where ONNX
        Runtime saves the graph it optimized, initializers of ``save_min_bytes`` and more (default
        ``weights_threshold``) in a ``.data`` file beside it."""
        ort = ort_module()
        provider = self.cpu if cpu else self.device
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for key, val in (options.get("session_options") or {}).items():
            setattr(so, key, val)
        if optimized:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        provider.configure(so, options, weights_as_inputs)
        if save_optimized:
            so.optimized_model_filepath = save_optimized
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        os.path.basename(save_optimized) + ".data")
            min_bytes = save_min_bytes if save_min_bytes is not None else int(options.get("weights_threshold", MiB))
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                        str(min_bytes))
        source: Any = graph
        if block is not None and not weights_as_inputs:
            if hasattr(so, "add_external_initializers_from_files_in_memory"):
                so.add_external_initializers_from_files_in_memory([WEIGHTS_FILE], [block.array[:nbytes]], [nbytes])
            else:   # older onnxruntime: the weights go through a scratch file
                source = self._scratch_files(graph, block, nbytes)
        try:
            return ort.InferenceSession(source, sess_options=so, providers=provider.providers(options))
        except ModelCacheError:
            raise
        except Exception as exc:
            raise InvalidModelError(f"ONNX Runtime rejected the model: {type(exc).__name__}: {str(exc)[:500]}",
                                    model=name) from exc

    def run_options(self, options: Dict[str, Any]) -> Any:
        return self.device.run_options(options)

    def shrink_arena(self) -> Optional[int]:
        """Give the free memory of the shared device arena back to the driver. The arena keeps
        what runs allocated (their working memory) until it is shrunk, so an architecture counts
        it until then (``SessionGroup.kept_bytes``); the cache has it shrunk before it evicts for
        room (``WeightsMode.reclaim``) and a session's going shrinks it. Runs on a thread of its
        own (ONNX Runtime keeps state for each thread that runs a session); on a simulated device
        with an arena (``SimulatedDevice(arena_keeps=)``) that arena instead; nothing without
        either. Returns the device bytes the process got back meanwhile
        (``DeviceMemory.measure_release``; None: no arena, or no reading)."""
        with self._lock:
            if self._shrinker is None:
                runner = self.memory.new_runner("ort-arena")
                try:
                    session = runner.call(self.device.arena_shrinker)
                except BaseException:
                    runner.shutdown()
                    raise
                if session is None:
                    runner.shutdown()
                self._shrinker = (runner if session is not None else None, session)
            runner, session = self._shrinker
        if session is None:
            if not self.memory.has_arena():     # a simulated device's arena stands for ONNX Runtime's
                return None
            with self.gate.read():
                return self.memory.measure_release(self.memory.shrink_arena)[1]
        feed = {"x": np.zeros(1, np.float32)}
        shrink = self.device.shrinking_run_options()
        with self.gate.read():
            _, released = self.memory.measure_release(lambda: runner.call(session.run, None, feed, shrink))
        return released

    # files ------------------------------------------------------------------------------------
    def host_files_dir(self, nbytes: int) -> str:
        """/dev/shm (RAM) when it has room for twice ``nbytes``, else the scratch folder."""
        with self._lock:
            if self._shm is None:
                try:
                    self._shm = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir="/dev/shm")
                except OSError:
                    self._shm = ""
            shm = self._shm
        if shm and shutil.disk_usage(shm).free >= 2 * nbytes + 64 * MiB:
            return shm
        return self.scratch_dir()

    def in_ram(self, folder: str) -> bool:
        """Whether ``folder`` is in RAM-backed storage (counts as host memory)."""
        return bool(self._shm) and folder.startswith(self._shm or "\0")

    def scratch_dir(self) -> str:
        with self._lock:
            if self._scratch is None:
                self._scratch = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=self._disk_dir)
            return self._scratch

    def _scratch_files(self, graph: bytes, block: HostBlock, nbytes: int) -> str:
        folder = tempfile.mkdtemp(dir=self.scratch_dir())
        with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
            f.write(block.array.data[:nbytes])
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(graph)
        return path

    def close(self) -> None:
        """Remove this backend's folders (files in RAM, scratch) and end the arena shrinker's
        thread; safe to call more than once."""
        with self._lock:
            shrinker, self._shrinker = self._shrinker, None
        if shrinker is not None and shrinker[0] is not None:
            shrinker[0].shutdown()
        for folder in (self._scratch, self._shm):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
