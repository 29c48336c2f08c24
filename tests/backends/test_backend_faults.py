"""Backends' errors reach the user typed, naming the model and the cause."""
import json
import os

import numpy as np
import pytest

import modelcache as mc
from doubles import trt_double

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402


@pytest.fixture
def cache(tmp_path):
    with mc.ModelCache(monitor=mc.SimulatedDevice("64MiB"), reserve=0, disk_dir=str(tmp_path / "disk"),
                       watch_interval=None) as c:
        yield c


@pytest.mark.parametrize("mode", ["weights", "session"])
def test_onnxruntime_run_failures_are_model_run_errors(cache, mode):
    """Inputs that pass the declared checks but fail inside ONNX Runtime (a reshape to a size the
    data does not have)."""
    w = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    cache.register("m", model.SerializeToString(), backend="onnxruntime", mode=mode, weights_threshold=1024,
                   sample_input={"x": np.ones((1, 64), np.float32), "shape": np.array([1, 64], np.int64)})
    with cache.use("m") as served:
        ok = served.run(None, {"x": np.ones((2, 64), np.float32), "shape": np.array([2, 64], np.int64)})[0]
        assert ok.shape == (2, 64)
        with pytest.raises(mc.ModelRunError, match=r"'m'.*ONNX Runtime failed to run") as err:
            served.run(None, {"x": np.ones((2, 64), np.float32), "shape": np.array([3, 7], np.int64)})
        assert not isinstance(err.value, (RuntimeError, ValueError)) and err.value.__cause__ is not None


def test_tensorrt_errors_name_the_model(cache, tmp_path):
    cache.register("unknown-module", b"\x00" * 64, backend="tensorrt", trt_module="no_such_tensorrt")
    with pytest.raises(mc.ModelCacheError, match=r"model 'unknown-module'.*no usable TensorRT module"):
        with cache.use("unknown-module"):
            pass
    plan = tmp_path / "p.plan"
    plan.write_bytes(trt_double.make_plan())
    (tmp_path / "p.plan.json").write_text("{not json")
    cache.register("bad-sidecar", str(plan), backend="tensorrt", trt_module=trt_double)
    with pytest.raises(mc.CorruptFileError, match=r"model 'bad-sidecar'.*sidecar .* is damaged"):
        with cache.use("bad-sidecar"):
            pass
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"not an onnx model")
    cache.register("bad-build", str(bad_onnx), backend="tensorrt", trt_module=trt_double, build={},
                   build_cache_dir=str(tmp_path / "plans"))
    with pytest.raises(mc.EngineBuildError, match=r"model 'bad-build'"):
        with cache.use("bad-build"):
            pass


def test_a_damaged_sidecar_of_a_parked_plan_is_dropped_and_reloaded(cache, tmp_path):
    plan = trt_double.make_plan()
    cache.register("e", plan, backend="tensorrt", trt_module=trt_double)
    cache.prefetch("e", tier=mc.Tier.HOST).result(5)
    path = cache.evict("e", tier=mc.Tier.DISK).disk_path
    with open(path + ".json", "w") as f:
        f.write("{damaged")
    with cache.use("e") as model:            # typed, logged, dropped; the loader gives the plan again
        assert model.engine is not None
    info = cache.info("e")
    assert "damaged" in info.last_error and info.loads == 2 and not os.path.exists(path + ".json")
    assert json.loads(json.dumps(cache.stats()))["errors.disk"] == 1


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")
def test_session_mode_files_in_dev_shm_of_an_ended_process_are_reclaimed(tmp_path):
    """Session mode keeps a parked model as files in /dev/shm: a process killed without close()
    leaves them, and the next ONNX Runtime backend reclaims them; a process that exits without
    close() removes them at exit."""
    import subprocess
    import sys
    from modelcache.backends.onnxruntime.sessions import FOLDER_PREFIX
    from modelcache.tools.generate import make_mlp, save_model
    path = save_model(make_mlp(256, 2, seed=0), str(tmp_path / "m.onnx"))
    script = (
        "import glob, os, sys, numpy as np, modelcache as mc\n"
        "c = mc.ModelCache(monitor=mc.SimulatedDevice('64MiB'), reserve=0, watch_interval=None)\n"
        f"c.register('m', {path!r}, mode='session')\n"
        "with c.use('m') as m: m.run(None, {'x': np.ones((1, 256), np.float32)})\n"
        "c.evict('m', tier=mc.Tier.HOST)\n"
        f"found = [p for p in glob.glob('/dev/shm/{FOLDER_PREFIX}%d-*' % os.getpid()) if os.listdir(p)]\n"
        "print(found[0] if found else '', flush=True)\n"
        "os._exit(0) if sys.argv[1] == 'kill' else None\n")
    killed = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True, text=True, check=True)
    left = killed.stdout.strip()
    assert left and os.listdir(left)               # the parked model's files, left behind by os._exit
    with mc.ModelCache(monitor=mc.SimulatedDevice("64MiB"), reserve=0, watch_interval=None) as cache:
        cache.register("n", path)
        with cache.use("n"):                       # the backend starts: it reclaims what ended processes left
            pass
        assert not os.path.exists(left)
    normal = subprocess.run([sys.executable, "-c", script, "exit"], capture_output=True, text=True, check=True)
    assert normal.stdout.strip() and not os.path.exists(normal.stdout.strip())   # removed at exit
