"""Where the process's device bytes go beyond the cache's books (the zoo stress's 1.07x peak):
NVML growth against the books after threaded runs, evictions, arena shrinks, reclaims, and
sessions dropped and made again (three cycles), with each session group's figures. Needs a GPU
and the zoo (``python benchmarks/zoo.py --export-only``); ``DIAG_SIM=1`` is a dry run on the CPU
builders and a simulated device. Writes $OUT/diag.json (OUT defaults to /tmp).

    python benchmarks/books_gap.py
"""
import os, sys, time, threading, json
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, os.path.dirname(__file__)); sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np, onnxruntime as ort
import modelcache as mc, zoo
MiB = 1 << 20
Z = "/tmp/modelcache-zoo"
names = ["resnet50", "resnet50-ft1", "bert-base", "bert-base-ft1", "mobilenet_v3_large", "vit_b_16"]
if os.environ.get("DIAG_SIM"):      # a dry run on the CPU: the builders on a simulated device
    from modelcache.tools.families import make_family
    import onnx
    os.makedirs("/tmp/simzoo", exist_ok=True); Z = "/tmp/simzoo"
    names = ["resnet-0", "resnet-1", "bert-0", "mobilenet-0"]
    for n in names:
        onnx.save(make_family(n.split("-")[0], seed=int(n[-1])), f"{Z}/{n}.onnx")
    cache = mc.ModelCache(monitor=mc.SimulatedDevice("1GiB", session_overhead="1MiB", run_overhead="1MiB"),
                          device_budget="900MiB", reserve=0, watch_interval=None, disk_dir="/tmp/mcdisk")
else:
    cache = mc.ModelCache(device=0, device_budget="60GiB", reserve=0, watch_interval=None, disk_dir="/tmp/mcdisk")
mon = cache.monitor
feeds = {}
for n in names:
    p = f"{Z}/{n}.onnx"
    cache.register(n, p, backend="onnxruntime")
    if os.environ.get("DIAG_SIM"):
        from modelcache.tools.families import sample_input
        import onnx
        feeds[n] = sample_input(onnx.load(p), seed=1)
    else:
        feeds[n] = zoo.sample_feed(ort.InferenceSession(p, providers=["CPUExecutionProvider"]))
for n in names:
    cache.prefetch(n, tier=mc.Tier.HOST).result()
out = []
base = [0, 0]
def books():
    with cache._lock:
        return cache._ledger.accounted_bytes()
def snap(label):
    p, b = mon.process_bytes(), books()
    groups = {}
    for e in cache._ledger.entries.values():
        h = e.handle
        g = getattr(h, "group", None)
        if g is not None and g.key[:8] not in groups:
            groups[g.key[:8]] = dict(n=round(g.nbytes / MiB), callers=round(g.callers.nbytes / MiB) if g.callers else None,
                                     work=round(g.working_bytes / MiB), peak=round(g.peak_bytes / MiB), ret=g.retained)
    row = dict(label=label, proc=round((p - base[0]) / MiB), books=round((b - base[1]) / MiB),
               gap=round(((p - base[0]) - (b - base[1])) / MiB), groups=groups)
    out.append(row); print(json.dumps(row), flush=True)
backend = None
for n in names:
    with cache.use(n, timeout=600) as m:
        m.run(None, feeds[n])
    cache.evict(n)
backend = cache._entries[names[0]].backend
base[0], base[1] = mon.process_bytes(), books()
snap("prepared, parked (base)")
pool = ThreadPoolExecutor(8)
def threaded(k=6):
    def work(i):
        for r in range(k):
            n = names[(i + r) % len(names)]
            with cache.use(n, timeout=600) as m:
                m.run(None, feeds[n])
    list(pool.map(work, range(8)))
threaded(); snap("after threaded runs, all resident")
backend.sessions.shrink_arena(); snap("  + arena shrunk")
for n in names: cache.evict(n)
snap("all evicted (parked)")
backend.reclaim_device_bytes(); snap("  + reclaimed")
for cycle in range(3):
    for n in names: cache.evict(n, tier=mc.Tier.DISK)
    time.sleep(0.2); snap(f"cycle {cycle}: all on disk, sessions dropped")
    threaded(); snap(f"cycle {cycle}: sessions made again, resident")
    for n in names: cache.evict(n)
    backend.reclaim_device_bytes(); snap(f"cycle {cycle}: parked, reclaimed")
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/diag.json", "w"), indent=1)
cache.close()
