"""Core-cache checks on a real NVIDIA GPU (skipped without one).

Set ``MODELCACHE_RESULTS_DIR`` to have the figures written there as JSON.
"""
import os
import subprocess
import sys
import time

import pytest

import modelcache as mc
from conftest import record

pytestmark = pytest.mark.gpu
MiB, GiB = 2**20, 2**30


def smi_memory(index=0):
    out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=memory.total,memory.used,memory.free",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
    total, used, free = (int(x) * MiB for x in out.strip().split(","))
    return total, used, free


def smi_process_bytes(pid):
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.strip().splitlines():
        p, used = (x.strip() for x in line.split(","))
        if int(p) == pid:
            return int(used) * MiB
    return 0


def test_nvml_monitor_agrees_with_nvidia_smi():
    torch = pytest.importorskip("torch")
    monitor = mc.NvmlMonitor(0)
    block = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda:0")   # this process holds ~2 GiB + context
    torch.cuda.synchronize()
    time.sleep(0.2)
    total, used, free = smi_memory(0)
    reading = monitor.reading()
    smi_proc = smi_process_bytes(os.getpid())
    ours_proc = monitor.process_bytes()
    result = {
        "gpu": monitor.name, "nvml_total": reading.total_bytes, "smi_total": total,
        "nvml_free": reading.free_bytes, "smi_free": free, "nvml_used": reading.used_bytes, "smi_used": used,
        "nvml_process": ours_proc, "smi_process": smi_proc,
    }
    record("nvml_vs_smi", result)
    # nvidia-smi rounds to MiB; readings taken moments apart on an otherwise idle GPU
    assert abs(reading.total_bytes - total) < MiB
    assert abs(reading.free_bytes - free) <= 8 * MiB
    # "used" in nvidia-smi excludes the driver's reserved memory; NVML's total - free includes it
    assert 0 <= reading.used_bytes - used <= 1 * GiB
    if smi_proc:
        assert abs(ours_proc - smi_proc) <= 8 * MiB
        assert ours_proc >= 2 * GiB
    del block
    torch.cuda.empty_cache()
    monitor.close()


HOLDER = """
import sys, torch
x = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
print("held", flush=True)
sys.stdin.read()
"""


def test_other_process_memory_triggers_pressure_eviction():
    torch = pytest.importorskip("torch")
    torch.cuda.init()
    torch.empty(1, device="cuda:0")        # create the context before measuring
    probe = mc.NvmlMonitor(0)
    free0 = probe.free_bytes()
    probe.close()
    model_bytes = 1 * GiB
    reserve = free0 - 8 * GiB              # 4 GiB of models + 4 GiB of slack above the reserve
    cache = mc.ModelCache(device=0, device_budget="8GiB", reserve=reserve, watch_interval=0.05)
    assert isinstance(cache.monitor, mc.NvmlMonitor)
    for i in range(4):
        cache.register(f"t{i}", (lambda i=i: torch.full((model_bytes // 4,), float(i))))
        with cache.use(f"t{i}") as tensor:
            assert tensor.is_cuda and float(tensor[0]) == i
    assert cache.stats()["evictions"] == 0
    before = cache.stats()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(5 * GiB)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        taken_at = time.monotonic()
        deadline = taken_at + 10
        while time.monotonic() < deadline and cache.monitor.free_bytes() < reserve:
            time.sleep(0.01)
        relieved_s = time.monotonic() - taken_at
        after = cache.stats()
        tiers = {e.name: str(e.tier) for e in cache.entries()}
        record("pressure_eviction", {
            "free_before_bytes": before["device.free_bytes"], "reserve_bytes": reserve,
            "other_process_bytes": 5 * GiB, "free_after_bytes": after["device.free_bytes"],
            "evictions_pressure": after["evictions.pressure"], "relieved_seconds": relieved_s,
            "tiers": tiers, "watch_interval_s": 0.05,
        })
        assert after["device.free_bytes"] >= reserve
        assert after["evictions.pressure"] >= 1        # 5 GiB (+ a context) taken, 4 GiB of slack
        assert list(tiers.values()).count("host") == after["evictions.pressure"]
        # still served: room made again by evicting another 1 GiB model first (the timeout bounds
        # the moves too: 1 GiB out and 1 GiB in through pageable host memory take about 0.5 s)
        with cache.use("t0", timeout=10) as tensor:
            assert float(tensor[0]) == 0
    finally:
        holder.stdin.close()
        holder.wait(30)
        cache.close()
