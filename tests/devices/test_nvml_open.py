"""Opening a GPU (an NvmlMonitor) asks cuBLAS for small workspaces before the process's first
cuBLAS use, unless the user chose a size: a service that runs a plain session (or the stress
harness its references) before the cache's first swap-in would otherwise give every parked
session cuBLAS's default workspaces (~130 MiB each on Hopper, measured 2026-12-03 on the H200).
Against a fake NVML."""
import os
import types

from modelcache.devices import cuda, nvml


class FakeNvml:
    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=1 << 34, free=1 << 33)


def _open(monkeypatch):
    monkeypatch.setattr(nvml, "_nvml", lambda: FakeNvml())
    monkeypatch.setattr(nvml, "_nvml_handle", lambda pynvml, device: object())
    monkeypatch.setattr(nvml, "_release", lambda: None)
    return nvml.NvmlMonitor(device=0)


def test_opening_a_gpu_asks_for_small_cublas_workspaces(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monitor = _open(monkeypatch)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == cuda.CUBLAS_WORKSPACE == ":4096:2"
    assert monitor.total_bytes() == 1 << 34


def test_a_size_the_user_chose_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    _open(monkeypatch)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
