"""Building plans from ONNX (the seed, §11): trtexec-like options and the build cache (ONNX ->
plan, keyed by the ONNX's sha256, the TensorRT version, the GPU and the build options), shared by
the "tensorrt" backend and ``modelcache convert``."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..._fileio import atomic_write, read_verified, sha256_file
from ...errors import ConfigError, CorruptFileError, EngineBuildError
from ...sizes import Size, parse_size
from .plans import SIDECAR_FORMAT, environment, read_sidecar, write_sidecar
from .runtime import import_trt, logger_for


# ---------------------------------------------------------------------------- build options
Shape = Tuple[int, ...]


@dataclass(frozen=True)
class BuildOptions:
    """trtexec-like options (the seed, §6/§11). ``profiles``: one dict per optimization profile,
    input name -> (min, opt, max) shapes. ``workspace``: bytes or ``"1GiB"``. ``fp16`` needs a
    TensorRT with the FP16 builder flag (TensorRT-RTX is strongly typed and has none)."""

    fp16: bool = False
    workspace: Optional[Size] = None
    profiles: Sequence[Dict[str, Tuple[Sequence[int], Sequence[int], Sequence[int]]]] = field(default_factory=tuple)
    compute_capability: Optional[str] = None   #: TensorRT-RTX target, e.g. "SM89"

    @classmethod
    def of(cls, value: Union[None, "BuildOptions", Dict[str, Any]]) -> "BuildOptions":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"fp16", "workspace", "profiles", "compute_capability"}
            if unknown:
                raise ConfigError(f"unknown build option(s) {sorted(unknown)}; known: fp16, workspace, profiles, "
                                  f"compute_capability")
            return cls(**value)
        raise ConfigError(f"build={value!r}: expected a dict or BuildOptions")

    def key(self) -> Dict[str, Any]:
        """A canonical, JSON-able form (part of the cache key and the sidecar)."""
        profiles = [{name: [list(map(int, s)) for s in shapes] for name, shapes in sorted(p.items())}
                    for p in self.profiles]
        workspace = parse_size(self.workspace, what="workspace") if self.workspace is not None else None
        return {"fp16": bool(self.fp16), "workspace": workspace, "profiles": profiles,
                "compute_capability": self.compute_capability}


# ---------------------------------------------------------------------------- the build cache
class BuildCache:
    """ONNX -> plan files under ``directory``, keyed by (ONNX sha256, TensorRT module and version,
    GPU, build options). A second request for a key is a hit; concurrent requests for one key build
    once (the others wait); plans and sidecars are written atomically. ``facts``: the device's
    ``DeviceMemory.describe()`` (None: CUDA device 0's, read through cuda-python where there is one)."""

    def __init__(self, directory: str, trt_module: Union[None, str, Any] = None,
                 facts: Optional[Dict[str, Any]] = None) -> None:
        self.directory = directory
        self.trt = import_trt(trt_module)
        if facts is None:
            from ...devices.cuda import describe_device
            facts = describe_device(0)
        self.facts = dict(facts)
        self._inflight: Dict[str, Future[None]] = {}
        self._lock = threading.Lock()
        self.hits = self.builds = 0
        os.makedirs(directory, exist_ok=True)

    def key(self, onnx_sha256: str, options: BuildOptions) -> str:
        env = environment(self.trt, self.facts)
        material = {"onnx_sha256": onnx_sha256, "trt_module": env["trt_module"], "trt_version": env["trt_version"],
                    "gpu_name": env["gpu_name"], "compute_capability": env["compute_capability"],
                    "options": options.key()}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, onnx_path: str, options: Union[None, BuildOptions, Dict[str, Any]] = None
            ) -> Tuple[str, Dict[str, Any], bool]:
        """``(plan_path, sidecar, hit)`` for the ONNX file at ``onnx_path``."""
        plan_path, sidecar, _, hit = self.fetch(onnx_path, options)
        return plan_path, sidecar, hit

    def fetch(self, onnx_path: str, options: Union[None, BuildOptions, Dict[str, Any]] = None
              ) -> Tuple[str, Dict[str, Any], Any, bool]:
        """``(plan_path, sidecar, plan, hit)``: :meth:`get` plus the plan (bytes read and checked
        against the sidecar's sha256 once, or the IHostMemory just built)."""
        opts = BuildOptions.of(options)
        if not os.path.exists(onnx_path):
            raise EngineBuildError(f"no ONNX file at {onnx_path}")
        onnx_sha = sha256_file(onnx_path)
        key = self.key(onnx_sha, opts)
        plan_path = os.path.join(self.directory, f"{key}.plan")
        while True:
            with self._lock:
                cached = self._cached(plan_path)
                if cached is not None:
                    self.hits += 1
                    return (plan_path, *cached, True)
                waiting = self._inflight.get(key)
                if waiting is None:
                    mine: Future[None] = Future()
                    self._inflight[key] = mine
                    break
            waiting.result()   # another thread builds this key; then it is a hit (or raise its error)
        try:
            sidecar, data = self._build(onnx_path, onnx_sha, opts, plan_path)
            with self._lock:
                self.builds += 1
            mine.set_result(None)
            return plan_path, sidecar, data, False
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _cached(self, plan_path: str) -> Optional[Tuple[Dict[str, Any], bytes]]:
        """(sidecar, plan bytes) of a sound entry; None if missing or damaged (then rebuilt)."""
        try:
            sidecar = read_sidecar(plan_path + ".json") if os.path.exists(plan_path) else None
        except CorruptFileError:
            return None                # a damaged entry is built again
        if sidecar is None:
            return None
        try:
            return sidecar, read_verified(plan_path, sidecar.get("plan_sha256") or "")
        except CorruptFileError:
            return None

    def _build(self, onnx_path: str, onnx_sha: str, opts: BuildOptions,
               plan_path: str) -> Tuple[Dict[str, Any], Any]:
        start = time.perf_counter()
        plan = build_plan(self.trt, onnx_path, opts)
        plan_sha = atomic_write(plan_path, memoryview(plan))
        sidecar = dict(environment(self.trt, self.facts))
        sidecar.update({"format": SIDECAR_FORMAT, "plan_sha256": plan_sha, "onnx_sha256": onnx_sha,
                        "onnx_path": os.path.abspath(onnx_path), "build_options": opts.key(),
                        "build_seconds": round(time.perf_counter() - start, 3),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_sidecar(plan_path + ".json", sidecar)
        return sidecar, plan


def build_plan(trt: Any, onnx_path: str, options: BuildOptions) -> Any:
    """Parse ``onnx_path`` and build a serialized plan (IHostMemory). Raises EngineBuildError
    carrying the parser's or TensorRT's messages."""
    logger = logger_for(trt)
    with logger.capture() as log:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(os.path.abspath(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors or log.errors(trt)))
        config = builder.create_builder_config()
        key = options.key()
        if key["workspace"] is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, key["workspace"])
        if options.fp16:
            flag = getattr(trt.BuilderFlag, "FP16", None)
            if flag is None:
                raise ConfigError(f"fp16: {getattr(trt, '__name__', trt)} has no FP16 builder flag (TensorRT-RTX "
                                  f"is strongly typed: convert the ONNX model to float16 instead)")
            config.set_flag(flag)
        if options.compute_capability:
            cc = getattr(getattr(trt, "ComputeCapability", None), options.compute_capability, None)
            if cc is None:
                raise ConfigError(f"compute_capability={options.compute_capability!r} is unknown to this TensorRT")
            config.num_compute_capabilities = 1
            config.set_compute_capability(cc, 0)
        for profile_shapes in (key["profiles"] or [_default_profile(network)]):
            if not profile_shapes:
                continue
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile_shapes.items():
                profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(f"TensorRT could not build {onnx_path}: " + "; ".join(log.errors(trt)[-5:]))
    return plan


def _default_profile(network: Any) -> Dict[str, List[List[int]]]:
    """Dynamic dimensions 1 (min), 1 (opt), 16 (max) when no profile is given."""
    profile = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            profile[tensor.name] = [[1 if d < 0 else d for d in shape], [1 if d < 0 else d for d in shape],
                                    [16 if d < 0 else d for d in shape]]
    return profile


def parse_shapes(text: str) -> Dict[str, List[int]]:
    """trtexec's shape syntax: ``"x:1x64,mask:1x128"`` -> ``{"x": [1, 64], "mask": [1, 128]}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, dims = part.rpartition(":")
        if not name or not dims:
            raise ConfigError(f"shape {part!r} is not NAME:DxDx...")
        try:
            out[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise ConfigError(f"shape {part!r} has a non-integer dimension") from None
    return out


def profiles_from_shapes(min_shapes: str, opt_shapes: str, max_shapes: str) -> List[Dict[str, Any]]:
    lo, opt, hi = parse_shapes(min_shapes), parse_shapes(opt_shapes), parse_shapes(max_shapes)
    if not (set(lo) == set(opt) == set(hi)):
        raise ConfigError("--minShapes, --optShapes and --maxShapes must name the same inputs")
    return [{name: (lo[name], opt[name], hi[name]) for name in lo}] if lo else []


