"""The zoo stress at 45 % (no baselines) with, at every 10 ms sample, the books, the runs' working
memory in flight, the stream-ordered pool's reserved vs used bytes, the reservations and the
runtime growth counted: what the process holds beyond the books at its peak. Needs a GPU, the
zoo (``python benchmarks/zoo.py --export-only``) and OUT set to a folder; prints the 12 highest
samples.

    OUT=/tmp python benchmarks/stress_pool.py
"""
import os, sys, json, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cuda.bindings import runtime as rt
from modelcache.tools.stress import contenders as C
from modelcache.tools.cli import main
err, pool = rt.cudaDeviceGetDefaultMemPool(0)
def attr(a):
    e, v = rt.cudaMemPoolGetAttribute(pool, a)
    return int(v)
A = rt.cudaMemPoolAttr
rows = []
orig = C.ModelCacheContender.device_bytes
def device_bytes(self):
    dev = orig(self)
    led = self.cache._ledger
    rows.append((time.perf_counter(), dev, self.accounted_bytes(), attr(A.cudaMemPoolAttrReservedMemCurrent),
                 attr(A.cudaMemPoolAttrUsedMemCurrent), self.cache.monitor.memory.working_bytes(),
                 len(led.reservations), led.runtime_bytes,
                 sum(1 for e in led.entries.values() if e.moving is not None)))
    return dev
C.ModelCacheContender.device_bytes = device_bytes
try:
    main(["stress", "--zoo", "/tmp/modelcache-zoo", "--budget-of-weights", "0.45", "--threads", "8", "--zipf-s", "1.1",
          "--requests", "2000", "--baselines", "", "--policies", "lru", "--no-progress",
          "--json", os.environ["OUT"] + "/s.json"])
finally:
    base = rows[0] if rows else None
    B = json.load(open(os.environ["OUT"] + "/s.json"))["budget_bytes"]
    top = sorted(rows, key=lambda r: -r[1])[:12]
    print("t dev/B books/B poolres poolused working res runtime moving")
    for r in top:
        print(round(r[0] - rows[0][0], 2), round(r[1] / B, 3), round(r[2] / B, 3), round(r[3] / 2**20), round(r[4] / 2**20),
              round(r[5] / 2**20), r[6], round(r[7] / 2**20), r[8])
    gaps = [(r[3] - r[4]) for r in rows]
    print("pool reserved-used MiB: median", sorted(gaps)[len(gaps) // 2] / 2**20, "max", max(gaps) / 2**20)
    print("first row", [round(x / 2**20) if isinstance(x, int) and x > 1000 else x for x in rows[0]])
    json.dump(rows, open(os.environ["OUT"] + "/rows.json", "w"))
