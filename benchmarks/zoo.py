"""Real architectures through modelcache: mode chosen, deviation, swap times, run time, parked bytes.

On a GPU machine with torch, torchvision and transformers (random weights; nothing is downloaded):

    python benchmarks/zoo.py --zoo /tmp/zoo --json zoo.json

exports resnet50, mobilenet_v3_large, vit_b_16, vit_l_16, bert-base and gpt2 into ``--zoo`` when
missing, plus three fine-tune-like variants each of resnet50, vit_b_16 and bert-base (the same graph
with other weights). Without torch, or with ``--builders``, the CPU builders of
``modelcache/tools/families.py`` at their "medium" size (and their Constant-node forms) are measured.

For every model, next to a plain ONNX Runtime session created as a user would (default options,
the device's provider) and measured in the same run:
- mode chosen by ``mode="auto"`` and why; its deviation from the plain session on a sample input;
- swap-in (median of ``--swaps``), the pinned-copy floor for its weights (a sample in each swap
  cycle) and the ratio; swap-out; the first result after an eviction, and its first run against
  the plain session's run after as long an idle as the swap-in (the device idles during a copy,
  and any first run after an idle gap is slower);
- run time, median of ``--runs`` interleaved runs: plain session vs the model held through a lease;
  ``with cache.use(...)`` + run vs run (the median of paired differences, 3x ``--runs`` pairs on the
  CPU), and a lease alone (a hit);
- the device bytes its architecture's session keeps while parked (measured by the cache, and the
  process's NVML growth once the whole architecture is parked).

Goals (exit 1 if one is missed; ``--no-goals`` to only report): every model in weights mode; run
time <= 1.05x the plain session on a GPU (1.15x on the CPU); use()+run <= run + 50 us; on a GPU,
swap-in <= 1.2x the floor for models of >= 100 MiB, swap-out <= 2 ms, first result after an
eviction <= swap-in + 1.1x run (the larger of the steady run and the plain session's run after the
same idle), and a parked architecture <= 32 MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modelcache as mc  # noqa: E402

MiB = 1 << 20
ZOO = ("resnet50", "mobilenet_v3_large", "vit_b_16", "vit_l_16", "bert-base", "gpt2")
VARIANTS = {"resnet50": 3, "vit_b_16": 3, "bert-base": 3}
SEQ = 128


# ----------------------------------------------------------------------------- the zoo (GPU machine)
def export_zoo(folder: str, names: List[str], variants: bool) -> List[Tuple[str, str, str]]:
    """(name, path, architecture) of each zoo model, exported with random weights when missing."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for arch in names:
        path = os.path.join(folder, f"{arch}.onnx")
        if not os.path.exists(path):
            start = time.perf_counter()
            _export(arch, path)
            print(f"exported {arch} in {time.perf_counter() - start:.1f} s", flush=True)
        out.append((arch, path, arch))
        for k in range(1, 1 + (VARIANTS.get(arch, 0) if variants else 0)):
            vpath = os.path.join(folder, f"{arch}-ft{k}.onnx")
            if not os.path.exists(vpath):
                _variant(path, vpath, seed=k)
            out.append((f"{arch}-ft{k}", vpath, arch))
    return out


def _export(arch: str, path: str) -> None:
    import torch
    torch.manual_seed(0)
    if arch in ("bert-base", "gpt2"):
        import transformers
        if arch == "bert-base":
            model = transformers.BertModel(transformers.BertConfig()).eval()
            args = (torch.randint(0, 1000, (1, SEQ)), torch.ones(1, SEQ, dtype=torch.int64))
            names = ["input_ids", "attention_mask"]
        else:
            model = transformers.GPT2Model(transformers.GPT2Config(use_cache=False)).eval()
            args = (torch.randint(0, 1000, (1, SEQ)),)
            names = ["input_ids"]
        wrapped = _FirstOutput(model)
    else:
        import torchvision
        model = getattr(torchvision.models, arch)(weights=None).eval()
        if arch.startswith("vit"):          # torchvision zero-initialises ViT heads: logits would be all zeros
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
            torch.nn.init.normal_(model.heads.head.bias, std=0.02)
        args = (torch.randn(1, 3, 224, 224),)
        names = ["x"]
        wrapped = model
    dynamo = arch in ("vit_b_16", "vit_l_16", "gpt2")    # the TorchScript exporter fails on these
    with torch.no_grad():
        if dynamo:
            program = torch.onnx.export(wrapped, args, input_names=names, output_names=["y"], dynamo=True,
                                        opset_version=18)
            program.save(path, external_data=True)
        else:
            torch.onnx.export(wrapped, args, path, input_names=names, output_names=["y"], opset_version=17,
                              dynamo=False)
            import onnx
            model_proto = onnx.load(path)
            onnx.save_model(model_proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(path) + ".data", size_threshold=1024)


class _FirstOutput:
    """A transformers model returning its last hidden state only (a tensor, not a dict)."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: Any) -> Any:
                return self.model(*args, return_dict=False)[0]

        return Wrapper().eval()


def _variant(path: str, out: str, seed: int) -> None:
    """The same graph with every floating-point weight perturbed by 1% (a fine-tune)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.nbytes >= 1024:
            noisy = array * (1 + 0.01 * rng.standard_normal(array.shape)).astype(array.dtype)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(array.dtype), init.name))
    onnx.save_model(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(out) + ".data", size_threshold=1024)


# ----------------------------------------------------------------------------- CPU builders
def build_families(folder: str) -> List[Tuple[str, str, str]]:
    from modelcache.tools.families import FAMILIES, make_family
    from modelcache.tools.generate import save_model
    out = []
    for family in FAMILIES:
        for suffix, kwargs in (("", {}), ("-ft1", {"seed": 1}), ("-const", {"constant_nodes": True})):
            path = os.path.join(folder, f"{family}{suffix}.onnx")
            if not os.path.exists(path):
                save_model(make_family(family, "medium", **kwargs), path, external_data=True)
            out.append((family + suffix, path, family + ("-const" if suffix == "-const" else "")))
    return out


# ----------------------------------------------------------------------------- measuring
def sample_feed(session: Any, seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (1 if axis == 0 else SEQ) for axis, d in enumerate(i.shape)]
        if "int64" in i.type:
            feed[i.name] = (np.ones(shape, np.int64) if "mask" in i.name else rng.integers(0, 1000, shape))
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_floor(memory: Any, block: Any, nbytes: int) -> Optional[float]:
    """Seconds of allocating a device buffer, copying ``nbytes`` into it from pinned host memory
    (``block``) and synchronizing: what a swap-in cannot beat. None off a GPU."""
    if memory.kind != "cuda":
        return None
    start = time.perf_counter()
    buf = memory.allocate(nbytes)
    memory.copy_to_device(buf.ptr, block.ptr, nbytes)
    memory.synchronize()
    elapsed = time.perf_counter() - start
    buf.free()
    return elapsed


def measure(cache: mc.ModelCache, name: str, path: str, providers: List[Any], runs: int, swaps: int,
            floor_sample: Callable[[int], Optional[float]], session_options: Dict[str, Any],
            pairs: Optional[int] = None) -> Dict[str, Any]:
    import onnxruntime as ort
    row: Dict[str, Any] = {"model": name}
    so = ort.SessionOptions()
    for key, value in session_options.items():
        setattr(so, key, value)
    plain = ort.InferenceSession(path, sess_options=so, providers=providers)
    feed = sample_feed(plain)
    expected = plain.run(None, feed)
    row["reference_std"] = float(np.std(expected[0]))          # outputs that vary: the comparison means something
    start = time.perf_counter()
    with cache.use(name, timeout=600) as model:
        row["first_swap_in_s"] = time.perf_counter() - start
        got = model.run(None, feed)
    info = cache.info(name)
    details = info.details
    scale = max(float(np.max(np.abs(e))) for e in expected)
    row.update(mode=details.get("mode"), why=details.get("mode_reason"), weights_bytes=details.get("weights_bytes"),
               deviation=max(float(np.max(np.abs(a - b))) for a, b in zip(expected, got)), output_scale=scale,
               check_deviation=details.get("deviation"), check_tolerance=details.get("tolerance"),
               optimized_graph=details.get("optimized_graph"))
    # run time: interleaved, the model held through one lease
    lease = cache.use(name)
    held = lease.acquire()
    plain_t, held_t, used_t, held2_t, direct_t = [], [], [], [], []
    for _ in range(5):
        plain.run(None, feed), held.run(None, feed)
    steps = [lambda: plain_t.append(_timed(lambda: plain.run(None, feed))),
             lambda: held_t.append(_timed(lambda: held.run(None, feed)))]
    if os.environ.get("ZOO_DIRECT"):    # diagnostic: the same run on this thread, without the runner hop
        names = [o.name for o in held.get_outputs()]
        checked = held._checked(feed)
        steps.append(lambda: direct_t.append(_timed(lambda: held._bind_and_run(names, checked, None))))
    for i in range(runs):           # rotating order: none goes first more often
        for k in range(len(steps)):
            steps[(i + k) % len(steps)]()
    if direct_t:
        row["direct_run_ms"] = statistics.median(direct_t) * 1e3
    # 1: this (the only) thread runs the session itself; 0: its runs went to the session's runner
    row["caller_threads"] = cache.info(name).details.get("caller_threads")

    def use_and_run() -> None:
        with cache.use(name) as m:
            m.run(None, feed)
    for i in range(pairs or runs):  # pairs in alternating order: neither goes first more often
        pair = [lambda: used_t.append(_timed(use_and_run)), lambda: held2_t.append(_timed(lambda: held.run(None, feed)))]
        for step in (pair if i % 2 == 0 else pair[::-1]):
            step()

    def hits(n: int = 200) -> float:
        start = time.perf_counter()
        for _ in range(n):
            with cache.use(name):
                pass
        return (time.perf_counter() - start) / n
    lease_s = statistics.median(hits() for _ in range(10))
    lease.release()
    run_s = statistics.median(held_t)
    row.update(plain_run_ms=statistics.median(plain_t) * 1e3, run_ms=run_s * 1e3,
               run_ratio=run_s / statistics.median(plain_t),
               # paired, interleaved: use()+run minus the run next to it (drift cancels out)
               use_overhead_us=statistics.median(u - h for u, h in zip(used_t, held2_t)) * 1e6,
               lease_us=lease_s * 1e6)
    # swaps, each cycle next to a floor sample (allocate, copy from pinned memory, synchronize) and
    # a plain run after as long an idle as the swap-in (the device idles during a copy: the first
    # run after any idle gap is slower, a plain session's too)
    weights = int(details.get("weights_bytes") or 0)
    ins, outs, firsts, floors, idle_runs = [], [], [], [], []
    for _ in range(swaps):
        outs.append(_timed(lambda: cache.evict(name)))
        floor = floor_sample(weights)
        if floor is not None:
            floors.append(floor)
        lease = cache.use(name, timeout=600)
        start = time.perf_counter()
        m = lease.acquire()
        ins.append(time.perf_counter() - start)
        m.run(None, feed)
        firsts.append(time.perf_counter() - start)
        lease.release()
        time.sleep(ins[-1])
        idle_runs.append(_timed(lambda: plain.run(None, feed)))
    cache.evict(name)
    floor = statistics.median(floors) if floors else None
    row.update(swap_in_ms=statistics.median(ins) * 1e3, swap_out_ms=statistics.median(outs) * 1e3,
               first_result_ms=statistics.median(firsts) * 1e3, floor_ms=floor * 1e3 if floor else None,
               swap_ratio=statistics.median(ins) / floor if floor else None,
               first_run_ms=statistics.median(f - i for f, i in zip(firsts, ins)) * 1e3,
               plain_after_idle_ms=statistics.median(idle_runs) * 1e3)
    info = cache.info(name)
    row.update(session_bytes=info.details.get("session_device_bytes"),
               session_peak_bytes=info.details.get("session_peak_bytes"),
               working_bytes=info.details.get("working_bytes"),
               shared_by=info.details.get("session_shared_by"))
    return row


def goals(row: Dict[str, Any], gpu: bool) -> List[str]:
    """The goals this row misses."""
    missed = []
    if row.get("error"):
        return [f"failed: {row['error']}"]
    if row["mode"] != "weights":
        missed.append("not in weights mode")
    if row["run_ratio"] > (1.05 if gpu else 1.15):
        missed.append(f"run {row['run_ratio']:.3f}x the plain session")
    if row["use_overhead_us"] > 50:
        missed.append(f"use() adds {row['use_overhead_us']:.0f} us")
    if row["reference_std"] == 0:
        missed.append("the reference output is constant: the comparison proves nothing")
    if gpu:
        if (row["weights_bytes"] or 0) >= 100 * MiB and row["swap_ratio"] is not None and row["swap_ratio"] > 1.2:
            missed.append(f"swap-in {row['swap_ratio']:.2f}x the floor")
        if row["swap_out_ms"] > 2.0:
            missed.append(f"swap-out {row['swap_out_ms']:.2f} ms")
        # "run": the plain session's run after an idle as long as the swap-in (see measure)
        if row["first_result_ms"] > row["swap_in_ms"] + 1.1 * max(row["run_ms"], row["plain_after_idle_ms"]):
            missed.append(f"first result {row['first_result_ms']:.2f} ms after an eviction")
    return missed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="/tmp/modelcache-zoo", help="folder of the exported models (made if missing)")
    p.add_argument("--builders", action="store_true", help="the CPU builders instead of the torch zoo")
    p.add_argument("--models", default="", help="comma-separated architectures (default: all)")
    p.add_argument("--no-variants", action="store_true")
    p.add_argument("--runs", type=int, help="interleaved runs per model (default: 50 on a GPU, 150 on the CPU, "
                   "where 50 runs' medians on a 2-core machine vary by about 4 %% from one model to its variant)")
    p.add_argument("--swaps", type=int, default=15)
    p.add_argument("--ort-options", default="{}", help="JSON of onnxruntime backend options for register()")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads for both sessions (default: 1 on the "
                   "CPU, where two sessions' spinning thread pools would disturb each other's timings; ONNX "
                   "Runtime's default on a GPU)")
    p.add_argument("--json", help="write the rows and the environment here")
    p.add_argument("--no-goals", action="store_true")
    p.add_argument("--export-only", action="store_true", help="export the zoo (when missing) and stop")
    a = p.parse_args()
    import onnxruntime as ort
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    import importlib.util
    have_torch = importlib.util.find_spec("torch") is not None
    use_builders = a.builders or not have_torch
    wanted = [m for m in a.models.split(",") if m]
    if use_builders:
        os.makedirs(a.zoo, exist_ok=True)
        models = [m for m in build_families(a.zoo) if not wanted or m[2].split("-")[0] in wanted]
    else:
        models = export_zoo(a.zoo, wanted or list(ZOO), not a.no_variants)
        if a.export_only:
            return 0
    monitor = None if gpu else mc.SimulatedDevice("32GiB")
    cache = mc.ModelCache(device=0 if gpu else None, monitor=monitor, device_budget="60GiB" if gpu else "30GiB",
                          reserve=0, watch_interval=None)
    options = json.loads(a.ort_options)
    threads = a.threads if a.threads is not None else (None if gpu else 1)
    runs = a.runs if a.runs is not None else (50 if gpu else 150)
    # use()'s cost is a difference of two runs: on the CPU their noise (runs of ~9 ms on 2 cores)
    # put the median of 150 differences 30-60 us either way, so it takes 3x as many pairs there
    pairs = runs if gpu else 3 * runs
    session_options = {"intra_op_num_threads": threads} if threads else {}
    if session_options:
        options.setdefault("session_options", {}).update(session_options)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    memory = cache.monitor.memory
    pool = memory.new_host_pool()
    blocks: Dict[int, Any] = {}

    def floor_sample(nbytes: int) -> Optional[float]:
        if nbytes not in blocks:
            blocks[nbytes] = pool.get(nbytes)
            copy_floor(memory, blocks[nbytes], nbytes)     # a first copy warms the path up
        return copy_floor(memory, blocks[nbytes], nbytes)

    head = (f"{'model':<22} {'mode':<8} {'deviation':>9} {'weights':>9} {'swap-in':>8} {'floor':>7} {'ratio':>5} "
            f"{'out':>6} {'first':>7} {'1st run':>7} {'idle':>6} {'plain':>7} {'mc run':>7} {'ratio':>6} {'use+':>6} "
            f"{'parked':>8}")
    print(f"device: {'GPU ' + cache.monitor.name if gpu else 'CPU (simulated device)'}; onnxruntime "
          f"{ort.__version__}; options {options}", flush=True)
    print(head + "\n" + "-" * len(head), flush=True)
    rows = []
    for name, path, arch in models:
        cache.register(name, path, backend="onnxruntime", **options)
        before = cache.monitor.process_bytes()
        try:
            row = measure(cache, name, path, providers, runs, a.swaps, floor_sample, session_options, pairs)
        except Exception as exc:
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        after = cache.monitor.process_bytes()
        if before is not None and after is not None and gpu:
            row["nvml_growth_parked"] = after - before     # what stays once the model is parked again
        row["architecture"] = arch
        rows.append(row)
        if "error" in row:
            print(f"{name:<22} FAILED {row['error']}", flush=True)
            continue
        ms = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{name:<22} {row['mode']:<8} {row['deviation']:>9.2e} {row['weights_bytes'] / MiB:>7.0f}Mi "
              f"{ms(row['swap_in_ms']):>8} {ms(row['floor_ms']):>7} "
              f"{'-' if row['swap_ratio'] is None else format(row['swap_ratio'], '.2f'):>5} {ms(row['swap_out_ms']):>6} "
              f"{ms(row['first_result_ms']):>7} {ms(row['first_run_ms']):>7} {ms(row['plain_after_idle_ms']):>6} "
              f"{ms(row['plain_run_ms']):>7} {ms(row['run_ms']):>7} "
              f"{row['run_ratio']:>6.3f} {row['use_overhead_us']:>5.0f}u "
              f"{(row['session_bytes'] or 0) / MiB:>6.0f}Mi"
              + (f" nvml+{row['nvml_growth_parked'] / MiB:.0f}Mi" if "nvml_growth_parked" in row else "")
              + (f" direct {row['direct_run_ms']:.2f}" if "direct_run_ms" in row else ""), flush=True)
        print(f"{'':<22} why: {row['why']}; runs on "
              f"{'this thread' if row.get('caller_threads') else 'the session runner (a hand-off per run)'}; "
              f"a lease alone: {row['lease_us']:.1f} us; a run's working memory "
              f"{(row['working_bytes'] or 0) / MiB:.0f} MiB; the session's making peaked "
              f"{(row['session_peak_bytes'] or 0) / MiB:.0f} MiB above what it keeps", flush=True)
    # a parked architecture: every model of it evicted, its shared session kept
    parked: Dict[str, Any] = {}
    for arch in dict.fromkeys(r["architecture"] for r in rows if "error" not in r):
        sizes = [r["session_bytes"] or 0 for r in rows if r.get("architecture") == arch and "error" not in r]
        parked[arch] = max(sizes)
    stats = cache.stats()
    print(f"\nparked sessions: {', '.join(f'{k} {v / MiB:.0f} MiB' for k, v in parked.items())}; sessions "
          f"{stats.get('onnxruntime.sessions')}, created {stats.get('onnxruntime.sessions.created')}, "
          f"device.parked_bytes {stats['device.parked_bytes'] / MiB:.0f} MiB", flush=True)
    if gpu:
        print(f"process device bytes (NVML) with every model parked: {stats.get('device.process_bytes', 0) / MiB:.0f} "
              f"MiB", flush=True)
    missed = {r["model"]: goals(r, gpu) for r in rows}
    for arch, nbytes in parked.items():
        if gpu and nbytes > 32 * MiB:
            missed.setdefault(f"{arch} (parked)", []).append(f"parked session {nbytes / MiB:.0f} MiB > 32 MiB")
    missed = {k: v for k, v in missed.items() if v}
    print("\ngoals: " + ("all met" if not missed else "missed: " + "; ".join(f"{k}: {', '.join(v)}"
                                                                             for k, v in missed.items())), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu, "device": cache.monitor.name,
                       "onnxruntime": ort.__version__, "options": options, "rows": rows, "parked": parked,
                       "stats": stats, "missed": missed}, f, indent=1, default=str)
    cache.close()
    for block in blocks.values():
        pool.put(block)
    pool.close()
    return 1 if missed and not a.no_goals else 0


if __name__ == "__main__":
    sys.exit(main())
