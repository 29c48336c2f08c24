"""ONNX models served by id from a Ray Serve deployment of several replicas, with modelcache as each
replica's memory manager and its router, side by side with Ray's own ``@serve.multiplexed``.

    pip install -e ".[ray,onnxruntime]"                   # GPU: ".[ray,gpu]"
    python examples/ray_serve.py --smoke                  # local Ray on the CPU, about a minute

Both contenders serve the same Zipf trace of model ids over the same models, with the same
replicas, per-replica device budget and concurrency, and every output is checked against the
model's reference (a plain ONNX Runtime session):

- ``modelcache``: :class:`modelcache.ray.ModelCacheReplica` (a ModelCache per replica, policy
  ``lfu``; models parked in host RAM at start, moved to the device by bytes, leases, concurrent
  loads) routed by
  :class:`modelcache.ray.ModelCacheRouter` (device, then host RAM, then disk, then fewest bytes
  evicted; ties by queue length);
- ``ray-multiplexed``: ``@serve.multiplexed(max_num_models_per_replica=K)`` with Ray's default
  router (by multiplexed model id), a stock ONNX Runtime session created on each miss, K = budget
  // largest model (the count that keeps a replica within its budget whatever models it holds);
  each miss loads on a thread of its own, one at a time (Ray's lock), while hits run.

A request is a hit when its model was on its replica's device when it arrived. It prints, for
each, requests/s, hit rate, p50/p99 latency (client side), errors and wrong outputs, and exits 1
if any request failed (an error, or no answer within ``--request-timeout``) or gave a wrong output.

``--smoke``: a local Ray on the CPU, 2 replicas each on a simulated device (copies cross a
simulated 250 MB/s link; each session costs 256 KiB of device memory), 24 generated MLPs of
0.5-2 MiB (29 MiB in all), 8 MiB per replica, 3000 requests from 4 concurrent clients; about a
minute. On a GPU (two replicas sharing GPU 0, each with half of 8 GiB, the ONNX files of a folder,
ids = file stems; references from a plain CPU session, outputs compared with a tolerance that
allows TF32)::

    python examples/ray_serve.py --device 0 --replicas 2 --budget 4GiB --models-dir zoo \\
        --requests 2000 --threads 16 --zipf-s 1.1 --json ray-gpu.json

Both deployments run side by side and serve the trace in turns of ``--chunk`` requests (who goes
first alternates), so that other work on the machine weighs on both alike. A contender stops
sending after ``--time-limit`` seconds of its own turns (Ray's multiplexing creates a CUDA session
at every miss, about a second each, one at a time per replica); the table then also compares them
on the part of the trace that all served. Processes Ray starts for a GPU run get
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1; a local Ray
runs without dashboard, usage report or HTTP proxy (requests go through a DeploymentHandle).

``--address auto`` uses a running Ray cluster instead (one replica per GPU: ``--gpus-per-replica 1``).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import modelcache as mc
import modelcache.ray as mcray
from modelcache.tools.stress.models import ModelSpec, generate_models, output_ok
from modelcache.tools.stress.workload import make_trace

MiB = 1 << 20
CONTENDERS = ("modelcache", "ray-multiplexed")
#: opt-in (--contenders): modelcache's replicas under Ray's default router (what the fallback gives)
EXTRA_CONTENDERS = ("modelcache-ray-router",)
#: set in every process Ray starts when a GPU is used: NVLink multicast stays off (NCCL, PyTorch, NVSHMEM)
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: a response carries at most this many values of its output (an evenly strided sample of a larger one)
SAMPLE_VALUES = 1 << 16


def sample(y: Any) -> np.ndarray:
    """The values of an output that a response carries and the client checks: all of them, or an
    evenly strided sample of a larger output (a language model's logits would otherwise cross
    Ray's object store at every request)."""
    flat = np.asarray(y).reshape(-1)
    return flat if flat.size <= SAMPLE_VALUES else flat[::-(-flat.size // SAMPLE_VALUES)]


def answer(y: Any, hit: bool, replica: str) -> Dict[str, Any]:
    return {"y": sample(y), "shape": tuple(np.shape(y)), "hit": hit, "replica": replica}


def correct(out: Dict[str, Any], spec: ModelSpec) -> bool:
    """The output's shape is the reference's, and its values match within the tolerance of
    ``output_ok`` (loose enough for TF32, tight enough to catch another model's output)."""
    return tuple(out["shape"]) == spec.reference.shape and output_ok(np.asarray(out["y"]), sample(spec.reference))


# ----------------------------------------------------------------------------- the deployments
class CachedModels(mcray.ModelCacheReplica):
    """A replica serving ONNX models by multiplexed model id through modelcache."""

    def __init__(self, paths: Dict[str, str], cache_options: Dict[str, Any], model_options: Dict[str, Any],
                 simulated: Optional[Dict[str, Any]], run_threads: int, prepare: bool) -> None:
        from ray import serve
        sim = dict(simulated) if simulated else None
        devices = None if sim else mcray.replica_devices()     # a GPU run: the GPU Ray gave this replica
        if devices == []:
            raise mcray.ReplicaSetupError("a GPU run, but Ray gave this replica no GPU (ray.get_gpu_ids() is empty)")
        super().__init__(paths.__getitem__, backend="onnxruntime", model_options=model_options, devices=devices,
                         simulated=(lambda: mc.SimulatedDevice(**sim)) if sim else mcray.DEFAULT_SIMULATED_TOTAL,
                         **cache_options)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.runs = concurrent.futures.ThreadPoolExecutor(run_threads, thread_name_prefix="inference")
        if prepare:    # as a small service may at start: every model parked in host RAM, checked on the device
            self.prepare(sorted(paths), swap_in=True)

    async def __call__(self, feed: Dict[str, np.ndarray]) -> Dict[str, Any]:
        lease = self.lease()
        async with lease as session:
            out = await asyncio.get_running_loop().run_in_executor(self.runs, session.run, None, feed)
        return answer(out[0], bool(lease.hit), self.replica)


class _Session:
    """What the Ray baseline's loader returns: a stock session, and its device bytes on a simulated
    device. Ray calls ``__del__`` when it evicts the model (and Python again at collection)."""

    def __init__(self, model_id: str, session: Any, allocation: Any, loaded: set) -> None:
        self.model_id, self.session, self.allocation, self.loaded = model_id, session, allocation, loaded
        loaded.add(model_id)

    def __del__(self) -> None:
        allocation, self.allocation = getattr(self, "allocation", None), None
        if allocation is not None:
            allocation.free()
        loaded = getattr(self, "loaded", None)
        if loaded is not None:
            loaded.discard(self.model_id)
            self.loaded = set()


class MultiplexedModels:
    """Ray Serve's own way: ``@serve.multiplexed`` keeps ``max_models`` sessions per replica (LRU by
    count), loading one at a time behind its lock (on a thread of its own, so hits keep running)."""

    def __init__(self, paths: Dict[str, str], sizes: Dict[str, int], max_models: int,
                 simulated: Optional[Dict[str, Any]], gpu: bool, run_threads: int) -> None:
        import onnxruntime as ort
        from ray import serve
        self.paths, self.sizes, self.gpu = paths, sizes, gpu
        self.device = mc.SimulatedDevice(**simulated) if simulated else None
        self.providers: List[Any] = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"] if gpu \
            else ["CPUExecutionProvider"]
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = 1
        self.ort = ort
        self.loaded: set = set()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.runs = concurrent.futures.ThreadPoolExecutor(run_threads, thread_name_prefix="inference")
        self.loads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="load")   # Ray loads one at a time

        async def load(model_id: str) -> _Session:       # off the event loop, so hits keep flowing
            return await asyncio.get_running_loop().run_in_executor(self.loads, self._create, model_id)
        self.get_model = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    def _create(self, model_id: str) -> _Session:
        allocation = None
        if self.device is not None:       # charged as modelcache's are: weights across the link, and a session
            self.device.copy(self.sizes[model_id])
            allocation = self.device.allocate(self.sizes[model_id] + self.device.session_overhead_bytes, model_id)
        try:
            session = self.ort.InferenceSession(self.paths[model_id], self.options, providers=self.providers)
            if self.gpu and session.get_providers()[0] != "CUDAExecutionProvider":
                raise mc.BackendError(f"ONNX Runtime made a session on {session.get_providers()}, not on the GPU: "
                                      f"install onnxruntime-gpu (and its CUDA libraries)", model=model_id)
        except BaseException:
            if allocation is not None:
                allocation.free()
            raise
        return _Session(model_id, session, allocation, self.loaded)

    async def __call__(self, feed: Dict[str, np.ndarray]) -> Dict[str, Any]:
        from ray import serve
        model_id = serve.get_multiplexed_model_id()
        hit = model_id in self.loaded
        model = await self.get_model(model_id)
        out = await asyncio.get_running_loop().run_in_executor(self.runs, model.session.run, None, feed)
        return answer(out[0], hit, self.replica)


# ----------------------------------------------------------------------------- the models
#: numpy types of ONNX input types
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def sample_input(name: str, onnx_type: str, shape: Sequence[Any], rng: np.random.Generator,
                 vocab: int = 1000) -> np.ndarray:
    """A value for one declared input of a model, of its type and shape (a symbolic dimension is 1
    on the first axis, 16 elsewhere): floating-point inputs (images...) standard normal; integer
    inputs token ids below ``vocab``, except masks (ones), token type or segment ids (zeros) and
    position ids (0, 1, 2...)."""
    dims = [d if isinstance(d, int) and d > 0 else (1 if axis == 0 else 16) for axis, d in enumerate(shape)]
    dtype = _NUMPY_TYPES.get(onnx_type)
    kind = name.lower()
    if dtype is None:
        raise SystemExit(f"input {name!r} is a {onnx_type}: this example makes inputs of {', '.join(_NUMPY_TYPES)}")
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(dims).astype(dtype)
    if dtype is np.bool_ or "mask" in kind:
        return np.ones(dims, dtype)
    if "type" in kind or "segment" in kind:
        return np.zeros(dims, dtype)
    if "position" in kind and dims:
        return np.broadcast_to(np.arange(dims[-1], dtype=dtype), dims).copy()
    return rng.integers(0, vocab, dims).astype(dtype)


def folder_specs(folder: str) -> List[ModelSpec]:
    """The ONNX files in ``folder`` (ids: the file stems), each with an input made from its declared
    inputs (token ids below 1000, or below the ``vocab`` its metadata names) and the reference
    output of a plain ONNX Runtime session on the CPU. A model's bytes: its file and the external
    data files it names."""
    import onnx
    import onnxruntime as ort
    names = sorted(f[:-len(".onnx")] for f in os.listdir(folder) if f.endswith(".onnx"))
    if not names:
        raise SystemExit(f"no .onnx files in {folder}")
    specs = []
    for k, name in enumerate(names):
        t0 = time.perf_counter()
        path = os.path.join(folder, name + ".onnx")
        proto = onnx.load(path, load_external_data=False)
        vocab = min(1000, int({p.key: p.value for p in proto.metadata_props}.get("vocab", 1000)))
        data = {os.path.join(folder, e.value) for t in proto.graph.initializer for e in t.external_data
                if e.key == "location"}
        nbytes = os.path.getsize(path) + sum(os.path.getsize(f) for f in data if os.path.exists(f))
        del proto
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(k)
        feed = {i.name: sample_input(i.name, i.type, i.shape, rng, vocab) for i in session.get_inputs()}
        reference = np.asarray(session.run(None, feed)[0])
        del session
        specs.append(ModelSpec(name, path, nbytes, feed, reference, name.split("-ft")[0]))
        print(f"    {name}: {mc.format_bytes(nbytes)}, inputs "
              f"{', '.join(f'{i} {v.dtype}{list(v.shape)}' for i, v in feed.items())}, output "
              f"{list(reference.shape)} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return specs


# ----------------------------------------------------------------------------- the run
def build_app(name: str, args: argparse.Namespace, specs: Sequence[ModelSpec], budget: int, max_models: int) -> Any:
    from ray import serve
    paths = {s.name: s.path for s in specs}
    sizes = {s.name: s.nbytes for s in specs}
    gpu = args.device is not None or args.address is not None
    actor: Dict[str, Any] = {"num_cpus": 0}
    if gpu:      # --device: every replica alive at once shares that GPU; a cluster: one GPU each unless told otherwise
        alive = args.replicas * (len(args.contenders) if args.chunk else 1)
        actor["num_gpus"] = args.gpus_per_replica or (1.0 / alive if args.device is not None else 1.0)
    simulated = None if gpu else {"total": 4 * budget, "name": "simulated GPU", "link_bytes_per_s": args.sim_link,
                                  "session_overhead": args.sim_session_overhead}
    common = dict(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing, ray_actor_options=actor,
                  graceful_shutdown_timeout_s=5)
    if name.startswith("modelcache"):
        options: Dict[str, Any] = {"session_options": {"intra_op_num_threads": 1}}
        if args.models_dir is None:   # generated: one topology at many widths, right in weights mode: one session
            threshold = max(1024, min(MiB, min(sizes.values()) // 8))
            options.update(mode="weights", verify=False, share_sizes=True, host_session=False,
                           weights_threshold=threshold)
        cache_options = {"device_budget": budget, "reserve": args.reserve if gpu else 0, "policy": args.policy,
                         "watch_interval": 0.1, "push_interval": args.push_interval}
        if args.max_swap_ins:
            cache_options["max_swap_ins"] = args.max_swap_ins
        if args.host_budget:
            cache_options["host_budget"] = args.host_budget
        routing = mcray.routing_options(max_queue_skew=args.skew) if name == "modelcache" else {}
        deployment = serve.deployment(name="CachedModels", **common, **routing)(CachedModels)
        return deployment.bind(paths, cache_options, options, simulated, args.run_threads, args.prepare)
    deployment = serve.deployment(name="MultiplexedModels", **common)(MultiplexedModels)
    return deployment.bind(paths, sizes, max_models, simulated, gpu, args.run_threads)


class Tally:
    """What one contender served of the trace: per request its latency and whether it hit, the
    errors and wrong outputs, the replicas that answered, and the seconds spent sending."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n
        self.latencies = np.full(n, np.nan)
        self.hits = np.zeros(n, dtype=bool)
        self.replicas: "collections.Counter[str]" = collections.Counter()
        self.failures: List[str] = []
        self.wrong = 0
        self.served = 0              # requests sent so far: the trace's first ``served``
        self.done = 0                # requests answered (or failed) so far
        self.seconds = 0.0
        self.stopped = False         # by its time limit

    def figures(self, k: Optional[int] = None) -> Dict[str, float]:
        """Hit rate and latency percentiles of the trace's first ``k`` requests (default: all it served)."""
        k = self.served if k is None else k
        if k == 0:
            return {"hit_rate": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
        lat = self.latencies[:k] * 1e3
        return {"hit_rate": float(self.hits[:k].mean()), "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99))}

    def report(self, common: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {"requests": self.n, "served": self.served, "seconds": round(self.seconds, 3),
                               "requests_per_s": self.served / self.seconds if self.seconds > 0 else 0.0,
                               **self.figures()}
        done = ~np.isnan(self.latencies)
        for label, which in (("hit", self.hits & done), ("miss", ~self.hits & done)):
            if which.any():
                out[f"{label}_p50_ms"] = float(np.percentile(self.latencies[which], 50) * 1e3)
                out[f"{label}_p99_ms"] = float(np.percentile(self.latencies[which], 99) * 1e3)
        return {**out, "errors": len(self.failures), "wrong": self.wrong,
                "first_error": self.failures[0] if self.failures else None,
                "busiest_replica_share": max(self.replicas.values()) / self.served if self.replicas else 0.0,
                "per_replica": dict(self.replicas), "common": {"requests": common, **self.figures(common)}}


async def drive(tally: Tally, handle: Any, trace: Sequence[str], stop: int, specs: Dict[str, ModelSpec],
                threads: int, *, request_timeout: float, time_limit: Optional[float], progress: bool) -> None:
    """Send the trace's requests from ``tally.served`` up to ``stop`` from ``threads`` concurrent
    clients, in order, each given at most ``request_timeout`` seconds; once the contender has spent
    ``time_limit`` seconds sending, it sends no more (those sent are awaited). Checks every output;
    with ``progress``, a line on stderr every 100 requests."""
    handles = {model: handle.options(multiplexed_model_id=model) for model in specs}
    start = time.perf_counter()
    deadline = start + time_limit - tally.seconds if time_limit else float("inf")

    async def client() -> None:
        while tally.served < stop and not tally.stopped:
            if time.perf_counter() >= deadline:
                tally.stopped = True
                break
            i = tally.served
            tally.served += 1
            spec = specs[trace[i]]
            t0 = time.perf_counter()
            try:
                out = await asyncio.wait_for(handles[spec.name].remote(spec.feed), request_timeout)
                tally.hits[i] = bool(out["hit"])
                tally.replicas[out["replica"]] += 1
                if not correct(out, spec):
                    tally.wrong += 1
            except asyncio.TimeoutError:
                tally.failures.append(f"{spec.name}: no answer within {request_timeout:g} s")
            except Exception as exc:
                tally.failures.append(f"{spec.name}: {type(exc).__name__}: {str(exc)[:300]}")
            tally.latencies[i] = time.perf_counter() - t0
            tally.done += 1
            if progress and tally.done % 100 == 0:
                seconds = tally.seconds + time.perf_counter() - start
                print(f"    {tally.name}: {tally.done}/{tally.n} requests in {seconds:.0f} s ({tally.done / seconds:.0f}/s), "
                      f"hit rate {tally.hits[:tally.served].mean():.1%}, errors {len(tally.failures)}, wrong "
                      f"{tally.wrong}", file=sys.stderr, flush=True)

    await asyncio.gather(*(client() for _ in range(threads)))
    tally.seconds += time.perf_counter() - start


async def serve_trace(handles: Dict[str, Any], trace: Sequence[str], specs: Dict[str, ModelSpec],
                      args: argparse.Namespace) -> Dict[str, Tally]:
    """Every contender serves the trace, in turns of ``args.chunk`` requests (0: one contender
    after the other), the first of each turn alternating, so that other work on the machine (and
    what a turn leaves running into the next) weighs on all of them alike."""
    n = len(trace)
    tallies = {name: Tally(name, n) for name in handles}
    chunk = args.chunk or max(n, 1)
    for turn, stop in enumerate(range(chunk, n + chunk, chunk)):
        names = list(handles) if turn % 2 == 0 else list(reversed(handles))   # who goes first alternates
        for name in names:
            handle, tally = handles[name], tallies[name]
            if tally.stopped:
                continue
            await drive(tally, handle, trace, min(stop, n), specs, args.threads, request_timeout=args.request_timeout,
                        time_limit=args.time_limit or None, progress=args.progress)
            if tally.stopped and args.progress:
                print(f"    {name}: time limit ({args.time_limit:g} s) reached after {tally.served} requests",
                      file=sys.stderr, flush=True)
    return tallies


def table(results: Dict[str, Dict[str, Any]]) -> str:
    rows = [("", *results), ("requests/s", *(f"{r['requests_per_s']:.0f}" for r in results.values())),
            ("hit rate", *(f"{r['hit_rate']:.1%}" for r in results.values())),
            ("p50 latency", *(f"{r['p50_ms']:.1f} ms" for r in results.values())),
            ("p99 latency", *(f"{r['p99_ms']:.1f} ms" for r in results.values())),
            ("busiest replica", *(f"{r['busiest_replica_share']:.0%} of requests" for r in results.values())),
            ("errors / wrong", *(f"{r['errors']} / {r['wrong']}" for r in results.values()))]
    common = min((r["served"] for r in results.values()), default=0)
    if any(r["served"] < r["requests"] for r in results.values()):    # a time limit stopped one: compare the same part
        rows.insert(1, ("requests served", *(f"{r['served']} of {r['requests']}" for r in results.values())))
        rows += [(f"hit rate, first {common}", *(f"{r['common']['hit_rate']:.1%}" for r in results.values())),
                 (f"p99, first {common}", *(f"{r['common']['p99_ms']:.1f} ms" for r in results.values()))]
    widths = [max(len(str(row[k])) for row in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="local Ray on the CPU: simulated devices, generated models")
    p.add_argument("--device", type=int, default=None, help="CUDA device the replicas share (a real GPU run)")
    p.add_argument("--address", default=None, help="a running Ray cluster (e.g. auto) instead of a local Ray")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs each replica holds (default: with --device 1/replicas, sharing it; with --address 1)")
    p.add_argument("--budget", default=None, help="device bytes each replica's models may take (smoke: 8MiB)")
    p.add_argument("--reserve", default="1GiB", help="device bytes kept free on a real GPU")
    p.add_argument("--host-budget", default=None,
                   help="host RAM each replica may park models in (default: half the available RAM)")
    p.add_argument("--models-dir", default=None,
                   help="ONNX files to serve (ids = file stems; inputs made from each model's declared inputs, "
                        "references from a plain CPU session); default: generated")
    p.add_argument("--models", type=int, default=24, help="generated models")
    p.add_argument("--min-size", default="512KiB", help="smallest generated model")
    p.add_argument("--max-size", default="2MiB", help="largest generated model")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--threads", type=int, default=4, help="concurrent clients")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--max-ongoing", type=int, default=8, help="max_ongoing_requests per replica")
    p.add_argument("--run-threads", type=int, default=2, help="threads running models in each replica")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a request may take; one without an answer by then counts as failed")
    p.add_argument("--time-limit", type=float, default=150.0,
                   help="seconds each contender may send requests for (0: no limit); the rest of the trace is "
                        "left out, and all are also compared on the part every one served")
    p.add_argument("--chunk", type=int, default=None,
                   help="the contenders, deployed side by side, serve the trace in turns of this many requests, so "
                        "that other work on the machine weighs on all alike (0: one contender after the other, each "
                        "deployed alone; default: 250, with --address 0)")
    p.add_argument("--ray-max-models", type=int, default=None,
                   help="Ray's max_num_models_per_replica (default: budget // largest model)")
    p.add_argument("--policy", default="lfu", choices=("lru", "lfu", "cost"),
                   help="modelcache's eviction policy in each replica")
    p.add_argument("--max-swap-ins", type=int, default=None, help="modelcache's max_swap_ins")
    p.add_argument("--push-interval", type=float, default=0.1,
                   help="modelcache's replicas: most one push of residency to the controller per this many seconds")
    p.add_argument("--skew", type=int, default=0,
                   help="modelcache's router: a replica whose queue is this much longer than the shortest counts "
                        "after the others (0: off; a full queue is skipped anyway)")
    p.add_argument("--sim-link", type=float, default=2.5e8, help="simulated host->device bytes/s")
    p.add_argument("--sim-session-overhead", default="256KiB", help="simulated device bytes per session")
    p.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                   help="modelcache's replicas park every model in host RAM at start and check it on the device once, "
                        "as `modelcache stress` does (--no-prepare: each loads what it is asked for, parks what it "
                        "evicts)")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"which to run, in order (also: {', '.join(EXTRA_CONTENDERS)}: modelcache's replicas under Ray's "
                        f"default router)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="print progress on stderr (default: on, except with --smoke)")
    args = p.parse_args(argv)
    gpu = args.device is not None or args.address is not None
    if args.budget is None:
        if gpu:
            p.error("--budget is needed on a real GPU (each replica's device bytes, e.g. 4GiB)")
        args.budget = "8MiB"
    args.skew = args.skew or None
    if args.smoke and gpu:
        p.error("--smoke runs on the CPU; leave out --device/--address")
    if args.progress is None:
        args.progress = not args.smoke
    if args.chunk is None:
        args.chunk = 0 if args.address else 250
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not args.contenders:
        p.error("--contenders names none")
    for name in args.contenders:
        if name not in CONTENDERS + EXTRA_CONTENDERS:
            p.error(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS + EXTRA_CONTENDERS)}")
    return args


def start_ray(args: argparse.Namespace, gpu: bool) -> Any:
    """A local Ray (no dashboard, no usage report: nothing leaves the machine; Serve without an
    HTTP proxy, requests go through a DeploymentHandle), or the cluster at ``--address``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = None
    if gpu:      # this process's environment reaches a local Ray's workers; runtime_env reaches a cluster's
        os.environ.update(GPU_ENV)
        runtime_env = {"env_vars": dict(GPU_ENV)}
    import ray
    from ray import serve
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if args.address:
        ray.init(address=args.address, log_to_driver=False, runtime_env=runtime_env)
        return ray
    if args.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.device)    # the replicas share this GPU
    ray.init(num_cpus=max(2, os.cpu_count() or 2), num_gpus=1 if args.device is not None else 0,
             include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    serve.start(proxy_location="Disabled")
    return ray


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    budget = mc.parse_size(args.budget, what="--budget")
    gpu = args.device is not None or args.address is not None
    if args.models_dir:
        print(f"the models of {args.models_dir}, with references from a plain CPU session:", flush=True)
        specs = folder_specs(args.models_dir)
    else:
        specs = generate_models(os.path.join(tempfile.mkdtemp(prefix="modelcache-ray-"), "models"), args.models,
                                mc.parse_size(args.min_size), mc.parse_size(args.max_size), layers=4, seed=args.seed)
    by_name = {s.name: s for s in specs}
    largest = max(s.nbytes for s in specs)
    if largest > budget:
        raise SystemExit(f"the largest model ({mc.format_bytes(largest)}) does not fit the budget "
                         f"({mc.format_bytes(budget)})")
    max_models = args.ray_max_models or max(1, budget // largest)
    trace = make_trace([s.name for s in specs], args.requests, "zipf", args.zipf_s, args.seed)
    total = sum(s.nbytes for s in specs)
    where = (f"GPU {args.device}" if args.device is not None else f"Ray cluster {args.address}") if gpu else \
        "simulated devices on the CPU"
    print(f"{len(specs)} models of {mc.format_bytes(min(s.nbytes for s in specs))}..{mc.format_bytes(largest)} "
          f"({mc.format_bytes(total)} in all); {args.replicas} replicas on {where}, each with a budget of "
          f"{mc.format_bytes(budget)}; {len(trace)} requests (Zipf s={args.zipf_s}) from {args.threads} clients; "
          f"Ray's multiplexing keeps {max_models} models per replica (budget // largest)", flush=True)

    ray = start_ray(args, gpu)
    from ray import serve
    ready: Dict[str, float] = {}
    tallies: Dict[str, Tally] = {}

    def deploy(name: str) -> Any:
        if args.progress:
            print(f"    {name}: starting {args.replicas} replicas...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        handle = serve.run(build_app(name, args, specs, budget, max_models), name=name, route_prefix=None)
        ready[name] = time.perf_counter() - t0
        return handle
    try:
        if args.chunk:      # side by side, in turns
            handles = {name: deploy(name) for name in args.contenders}
            tallies = asyncio.run(serve_trace(handles, trace, by_name, args))
        else:               # one after the other, each alone on the machine (and its GPUs)
            for name in args.contenders:
                tallies.update(asyncio.run(serve_trace({name: deploy(name)}, trace, by_name, args)))
                serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    common = min(t.served for t in tallies.values())
    results = {name: {**t.report(common), "startup_s": round(ready[name], 1)} for name, t in tallies.items()}
    for name, r in results.items():
        stopped = f" (time limit: {r['served']} of {r['requests']} sent)" if r["served"] < r["requests"] else ""
        print(f"  {name}: ready in {r['startup_s']:.1f} s; {r['requests_per_s']:.0f} requests/s{stopped}, hit rate "
              f"{r['hit_rate']:.1%}, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms (hits: p50 "
              f"{r.get('hit_p50_ms', float('nan')):.1f}, p99 {r.get('hit_p99_ms', float('nan')):.1f}; misses: p50 "
              f"{r.get('miss_p50_ms', float('nan')):.1f}, p99 {r.get('miss_p99_ms', float('nan')):.1f}), "
              f"errors {r['errors']}, wrong {r['wrong']}" + (f"; first error: {r['first_error']}" if r["first_error"]
                                                             else ""), flush=True)
    print()
    print(table(results))
    print(f"\n(total {time.perf_counter() - started:.0f} s)", flush=True)
    if args.json:
        import onnxruntime
        report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "where": where, "budget_bytes": budget,
                  "replicas": args.replicas, "requests": len(trace), "threads": args.threads, "zipf_s": args.zipf_s,
                  "time_limit_s": args.time_limit, "chunk": args.chunk, "ray_max_models": max_models,
                  "versions": {"python": platform.python_version(), "ray": ray.__version__,
                               "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
                  "cpus": os.cpu_count(), "models": [{"name": s.name, "bytes": s.nbytes} for s in specs],
                  "contenders": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"JSON: {args.json}")
    failed = any(r["errors"] or r["wrong"] for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
