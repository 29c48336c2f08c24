"""A pycuda-based, TensorRT-sample-style service embeds modelcache (GPU; needs pycuda and
onnxruntime-gpu, skipped without them). Each context kind runs in its own process
(tests/devices/pycuda_service.py): pycuda's context is made at import, once per process.

- ``pycuda.autoprimaryctx``: pycuda works in the device's primary context, the one ONNX Runtime
  and modelcache use, so host arrays and pycuda device buffers both run with correct results.
- ``pycuda.autoinit``: pycuda makes a context of its own. Host arrays and pycuda device buffers
  run with correct results, and pycuda's context stays current on the service's thread through
  runs, IOBinding calls, swap-ins, evictions and close (modelcache switches to the primary
  context for its own work and back; a bare ``cudaSetDevice`` would not give it back).
- ``crossread`` (no modelcache): a plain ONNX Runtime CUDA session reads a buffer of autoinit's
  context correctly: the fact that lets autoinit services bind their buffers.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import record

pytestmark = pytest.mark.gpu
SERVICE = os.path.join(os.path.dirname(__file__), "pycuda_service.py")


@pytest.fixture(scope="module", autouse=True)
def needs_pycuda_and_cuda_ort():
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed (benchmarks/build_pycuda.sh builds it)")
    ort = pytest.importorskip("onnxruntime")
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")


def serve(mode: str, folder, clean_exit: bool = True) -> dict:
    proc = subprocess.run([sys.executable, SERVICE, mode, str(folder)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    if clean_exit:
        assert proc.returncode == 0, f"{mode} service failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        # pycuda pops its context at exit and reports there if it was no longer current
        assert "PyCUDA ERROR" not in proc.stderr and "cuCtxPopCurrent" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{mode}: no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    result["exit_status"] = proc.returncode
    record(f"pycuda_{mode}", result)
    return result


def check_common(result: dict) -> None:
    assert result["references_vary"]
    assert result["pycuda_works_before"] and result["pycuda_works_after"]
    assert len(result["runs"]) == 9
    for run in result["runs"]:
        assert run["host_ok"], run
        assert run["providers"] == ["CUDAExecutionProvider"], run
        assert run["buffer_in_own_context"], run
        assert run["tier_after_evict"] != "DEVICE", run
    # the service's context was current after every step (the driver's view, not pycuda's)
    assert result["displaced_after"] == [], result["displaced_after"]
    assert result["stats"]["misses"] >= 9          # every use followed an eviction: real swap-ins


def test_autoprimaryctx_service_runs_host_and_device_buffers(tmp_path):
    result = serve("autoprimaryctx", tmp_path)
    check_common(result)
    assert result["context_is_primary"]
    assert [run["device"] for run in result["runs"]] == ["ok"] * 9


def test_autoinit_service_keeps_its_context_and_runs_host_and_device_buffers(tmp_path):
    result = serve("autoinit", tmp_path)
    check_common(result)
    assert not result["context_is_primary"]
    # the control: a bare cudaSetDevice on this thread would have displaced pycuda's context
    assert result["raw_cudaSetDevice_displaces_context"]
    assert [run["device"] for run in result["runs"]] == ["ok"] * 9


def test_a_plain_session_reads_a_buffer_of_autoinits_context(tmp_path):
    """Without modelcache: what lets an autoinit service bind its own device buffers."""
    result = serve("crossread", tmp_path)
    assert result["buffer_in_own_context"]
    assert result["read"] == "ok", result
