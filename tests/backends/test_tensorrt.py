"""TensorRT backend. Real TensorRT-RTX (CPU-only here) covers building, the build cache, plan files,
sidecars and TensorRT's refusals; the device tier runs against ``trt_double``."""
import json
import os
import threading

import numpy as np
import pytest

import modelcache as mc
from doubles import trt_double
from conftest import array_loader
from modelcache.backends.tensorrt.build import BuildCache, environment, parse_shapes, profiles_from_shapes
from modelcache.tools.cli import main as cli_main

onnx = pytest.importorskip("onnx")
from modelcache.tools.generate import make_mlp, save_model  # noqa: E402

try:
    import tensorrt_rtx_bindings as rtx
except ImportError:  # pragma: no cover - installed by the dev extra
    rtx = None
needs_rtx = pytest.mark.skipif(rtx is None, reason="tensorrt-rtx is not installed")
MiB = 1 << 20
PROFILE = [{"x": ((1, 64), (4, 64), (8, 64))}]


@pytest.fixture
def onnx_path(tmp_path):
    return save_model(make_mlp(64, 2), str(tmp_path / "mlp.onnx"))


@pytest.fixture
def sim_cache(tmp_path):
    device = mc.SimulatedDevice("64MiB")
    with mc.ModelCache(monitor=device, device_budget="32MiB", reserve=0, disk_dir=str(tmp_path / "disk"),
                       watch_interval=None) as cache:
        cache.sim = device
        yield cache


@pytest.fixture(autouse=True)
def reset_double():
    for key in trt_double.STATS:
        trt_double.STATS[key] = 0 if key != "live_engines" else trt_double.STATS[key]
    yield


# ------------------------------------------------------------------ real TensorRT-RTX, CPU only
@needs_rtx
def test_onnx_to_plan_then_cache_hit(tmp_path, onnx_path):
    cache = BuildCache(str(tmp_path / "plans"), rtx, facts={})
    plan_path, sidecar, hit = cache.get(onnx_path, {"profiles": PROFILE, "workspace": "64MiB"})
    assert not hit and os.path.getsize(plan_path) > 1000
    assert sidecar["trt_module"] == "tensorrt_rtx_bindings" and sidecar["trt_version"] == rtx.__version__
    assert sidecar["build_options"]["workspace"] == 64 * MiB and sidecar["build_options"]["profiles"][0]["x"] == \
        [[1, 64], [4, 64], [8, 64]]
    on_disk = json.load(open(plan_path + ".json"))
    assert on_disk["plan_sha256"] and on_disk["onnx_sha256"] == sidecar["onnx_sha256"]
    again, sidecar2, hit2 = cache.get(onnx_path, {"profiles": PROFILE, "workspace": "64MiB"})
    assert hit2 and again == plan_path and (cache.builds, cache.hits) == (1, 1)
    other, _, hit3 = cache.get(onnx_path, {"profiles": PROFILE, "workspace": "128MiB"})   # another key
    assert not hit3 and other != plan_path and cache.builds == 2
    assert not [n for n in os.listdir(tmp_path / "plans") if n.startswith(".tmp")]


@needs_rtx
def test_concurrent_builds_of_one_key_build_once(tmp_path, onnx_path):
    cache = BuildCache(str(tmp_path / "plans"), rtx, facts={})
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(onnx_path, {"profiles": PROFILE})))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert cache.builds == 1 and cache.hits == 7
    assert len({path for path, _, _ in results}) == 1


@needs_rtx
def test_damaged_cache_entry_is_rebuilt(tmp_path, onnx_path):
    cache = BuildCache(str(tmp_path / "plans"), rtx, facts={})
    plan_path, _, _ = cache.get(onnx_path, {"profiles": PROFILE})
    with open(plan_path, "r+b") as f:
        f.write(b"\0" * 16)
    _, _, hit = cache.get(onnx_path, {"profiles": PROFILE})
    assert not hit and cache.builds == 2


@needs_rtx
def test_bad_onnx_gives_build_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    with pytest.raises(mc.EngineBuildError, match="parse"):
        BuildCache(str(tmp_path / "plans"), rtx, facts={}).get(str(bad))


@needs_rtx
def test_rtx_plan_through_the_cache_refused_without_gpu(sim_cache, onnx_path):
    sim_cache.register("engine", onnx_path, backend="tensorrt", build={"profiles": PROFILE})
    sim_cache.register("other", array_loader(3))
    with pytest.raises(mc.EngineDeserializationError) as err:
        with sim_cache.use("engine"):
            pass
    assert "'engine'" in str(err.value) and err.value.trt_messages
    assert "cudaError" in str(err.value) or "CUDA" in str(err.value)      # TensorRT's own words
    assert sim_cache.info("engine").tier is mc.Tier.HOST
    assert sim_cache.sim.process_bytes() == 0                            # nothing left allocated
    with sim_cache.use("other") as model:                                # the cache keeps serving
        assert model[0] == 3
    assert sim_cache.stats()["tensorrt.deserialization_errors"] == 1


@needs_rtx
@pytest.mark.parametrize("damage", ["garbage", "truncated", "corrupt"])
def test_bad_plans_raise_with_tensorrts_message(sim_cache, tmp_path, onnx_path, damage):
    plan_path, _, _ = BuildCache(str(tmp_path / "plans"), rtx, facts={}).get(onnx_path, {"profiles": PROFILE})
    plan = open(plan_path, "rb").read()
    bad = {"garbage": b"garbage!" * 512, "truncated": plan[: len(plan) // 3],
           "corrupt": plan[:64] + bytes(b ^ 0x5A for b in plan[64:256]) + plan[256:]}[damage]
    sim_cache.register("bad", bad, backend="tensorrt", trt_module=rtx)
    with pytest.raises(mc.EngineDeserializationError) as err:
        with sim_cache.use("bad"):
            pass
    assert "[ERROR]" in str(err.value) and "'bad'" in str(err.value)
    if damage == "garbage":
        assert "magicTag" in str(err.value)
    assert sim_cache.info("bad").tier is mc.Tier.HOST


@needs_rtx
def test_plan_and_sidecar_on_disk_checksum_verified(sim_cache, tmp_path, onnx_path):
    plan_path, sidecar, _ = BuildCache(str(tmp_path / "plans"), rtx, facts={}).get(onnx_path,
                                                                                          {"profiles": PROFILE})
    sim_cache.register("p", plan_path, backend="tensorrt", trt_module=rtx)
    sim_cache.prefetch("p", tier=mc.Tier.HOST).result(30)
    info = sim_cache.evict("p", tier=mc.Tier.DISK)
    written = json.load(open(info.disk_path + ".json"))
    assert written["plan_sha256"] == sidecar["plan_sha256"] and written["trt_version"] == rtx.__version__
    assert open(info.disk_path, "rb").read() == open(plan_path, "rb").read()
    sim_cache.prefetch("p", tier=mc.Tier.HOST).result(30)               # read back, checksum verified
    assert sim_cache.info("p").tier is mc.Tier.HOST and sim_cache.info("p").host_bytes == len(open(plan_path, "rb").read())
    info = sim_cache.evict("p", tier=mc.Tier.DISK)
    with open(info.disk_path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    sim_cache.prefetch("p", tier=mc.Tier.HOST).result(30)       # the damaged copy is dropped; the loader reads again
    info = sim_cache.info("p")
    assert "sha256" in info.last_error and info.loads == 2 and info.tier is mc.Tier.HOST
    with open(plan_path, "r+b") as f:                                     # a damaged .plan given by path
        f.seek(100)
        f.write(b"\xff" * 8)
    sim_cache.register("q", plan_path, backend="tensorrt", trt_module=rtx)
    with pytest.raises(mc.CorruptFileError):
        sim_cache.prefetch("q", tier=mc.Tier.HOST).result(30)


@needs_rtx
def test_compatibility_mismatch_is_detected(sim_cache, tmp_path, onnx_path):
    plan_path, sidecar, _ = BuildCache(str(tmp_path / "plans"), rtx, facts={}).get(onnx_path,
                                                                                          {"profiles": PROFILE})
    foreign = tmp_path / "foreign.plan"
    foreign.write_bytes(open(plan_path, "rb").read())
    sidecar = dict(sidecar, trt_version="0.9.0", onnx_path=None)
    (tmp_path / "foreign.plan.json").write_text(json.dumps(sidecar))
    sim_cache.register("foreign", str(foreign), backend="tensorrt", trt_module=rtx)
    with pytest.raises(mc.EngineCompatibilityError) as err:
        with sim_cache.use("foreign"):
            pass
    assert "'0.9.0'" in str(err.value) and repr(rtx.__version__) in str(err.value)
    assert sim_cache.info("foreign").tier is mc.Tier.HOST


@needs_rtx
def test_convert_command(tmp_path, onnx_path, capsys):
    args = ["convert", onnx_path, "--out", str(tmp_path / "plans"), "--trt-module", "tensorrt_rtx_bindings",
            "--minShapes", "x:1x64", "--optShapes", "x:4x64", "--maxShapes", "x:8x64", "--workspace", "64MiB"]
    assert cli_main(args) == 0
    first = capsys.readouterr().out
    assert "built" in first and ".plan" in first
    assert cli_main(args) == 0
    assert "cache hit" in capsys.readouterr().out
    assert cli_main(["convert", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "plans"),
                     "--trt-module", "tensorrt_rtx_bindings"]) == 2     # a usage error: one line, exit 2


def test_trtexec_shape_syntax():
    assert parse_shapes("x:1x64,mask:2x128") == {"x": [1, 64], "mask": [2, 128]}
    assert profiles_from_shapes("x:1x64", "x:4x64", "x:8x64") == [{"x": ([1, 64], [4, 64], [8, 64])}]
    with pytest.raises(mc.ConfigError):
        parse_shapes("x=1x64")
    with pytest.raises(mc.ConfigError):
        profiles_from_shapes("x:1x64", "y:4x64", "x:8x64")


# ------------------------------------------------------------------ device tier, against the double
def run_and_check(model, batch=3):
    x = np.arange(batch * 8, dtype=np.float32).reshape(batch, 8)
    out = model.run({"x": x})
    np.testing.assert_array_equal(out["y"], 2 * x)


def test_device_host_disk_moves_without_reserializing(sim_cache):
    plan = trt_double.make_plan(weights_bytes=2 * MiB)
    sim_cache.register("e", plan, backend="tensorrt", trt_module=trt_double)
    for tier in [mc.Tier.HOST, mc.Tier.DISK, mc.Tier.UNLOADED, mc.Tier.HOST]:
        with sim_cache.use("e") as model:
            run_and_check(model)
            info = sim_cache.info("e")
            assert info.tier is mc.Tier.DEVICE and info.device_bytes == len(plan)
            assert info.details["scratch_bytes"] == 1 * MiB and info.host_bytes == len(plan)
        sim_cache.evict("e", tier=tier)
        assert sim_cache.info("e").tier is tier
    assert trt_double.STATS["serialize"] == 0          # the plan bytes were known: never serialized again
    assert trt_double.STATS["deserialize"] == 4
    assert sim_cache.stats()["tensorrt.deserializations"] == 4


def test_engine_loader_serializes_once(sim_cache):
    runtime = trt_double.Runtime(trt_double.ILogger())
    engine = runtime.deserialize_cuda_engine(trt_double.make_plan())
    sim_cache.register("live", lambda: engine, backend="tensorrt", trt_module=trt_double)
    with sim_cache.use("live") as model:
        run_and_check(model)
        assert sim_cache.info("live").details["plan_known"] is False
    for _ in range(3):
        sim_cache.evict("live")
        with sim_cache.use("live") as model:
            run_and_check(model)
    assert trt_double.STATS["serialize"] == 1
    assert sim_cache.info("live").details["serializations"] == 1


def test_scratch_pool_is_shared_and_sized_to_the_largest(sim_cache):
    for name, scratch in [("small", 1 * MiB), ("large", 4 * MiB), ("mid", 2 * MiB)]:
        plan = trt_double.make_plan(scratch_bytes=scratch, sleep_s=0.05)
        sim_cache.register(name, plan, backend="tensorrt", trt_module=trt_double)
        with sim_cache.use(name) as model:
            run_and_check(model)
    stats = sim_cache.stats()
    assert stats["tensorrt.scratch.slot_bytes"] == 4 * MiB
    assert stats["tensorrt.scratch.bytes"] <= 4 * MiB + 2 * MiB   # one slot of the largest (+ the first small one, freed)
    errors = []

    def runner(name):
        try:
            with sim_cache.use(name) as model:
                run_and_check(model)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(n,)) for n in ["small", "large", "mid"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    stats = sim_cache.stats()
    concurrent = trt_double.STATS["max_concurrent"]
    assert 1 <= concurrent <= 3
    assert stats["tensorrt.scratch.bytes"] <= 3 * 4 * MiB               # a slot per run in flight, not per engine
    assert stats["tensorrt.scratch.peak_slots"] <= 3
    sim_cache.evict("large")
    assert sim_cache.stats()["tensorrt.scratch.slot_bytes"] == 2 * MiB   # idle 4 MiB slots are freed
    assert sim_cache.stats()["tensorrt.scratch.bytes"] <= 3 * 2 * MiB
    assert sim_cache.sim.allocations().get("tensorrt-scratch", 0) == sim_cache.stats()["tensorrt.scratch.bytes"]


def test_user_managed_contexts_get_scratch_memory(sim_cache):
    sim_cache.register("e", trt_double.make_plan(scratch_bytes=3 * MiB), backend="tensorrt", trt_module=trt_double)
    with sim_cache.use("e") as model:
        run_and_check(model)                                # the double fails a USER_MANAGED run without memory
        ctx = sim_cache._entries["e"].handle.contexts[0].context
        assert ctx.strategy == trt_double.ExecutionContextAllocationStrategy.USER_MANAGED
        assert ctx._memory[1] >= 3 * MiB


def test_leases_respected_with_engines(tmp_path):
    device = mc.SimulatedDevice("64MiB")
    with mc.ModelCache(monitor=device, device_budget=5 * MiB, reserve=0, watch_interval=None) as cache:
        for name in "ab":
            cache.register(name, trt_double.make_plan(weights_bytes=3 * MiB), backend="tensorrt",
                           trt_module=trt_double)
        with cache.use("a") as model:
            with pytest.raises(mc.ModelInUseError):
                cache.evict("a")
            with pytest.raises(mc.DeviceBusyError):
                with cache.use("b", timeout=0.1):
                    pass
            run_and_check(model)                            # still resident and working
        with cache.use("b") as model:                       # a's lease is gone: a is evicted for b
            run_and_check(model)
        assert cache.info("a").tier is mc.Tier.HOST


def test_bad_inputs_and_stale_model(sim_cache):
    sim_cache.register("e", trt_double.make_plan(), backend="tensorrt", trt_module=trt_double)
    with sim_cache.use("e") as model:
        with pytest.raises(mc.ModelInputError, match="unknown \\['z'\\]"):
            model.run({"z": np.zeros((1, 8), np.float32)})
        with pytest.raises(mc.ModelCacheError, match="unknown output"):
            model.run({"x": np.zeros((1, 8), np.float32)}, output_names=["w"])
    sim_cache.evict("e")
    with pytest.raises(mc.ModelCacheError, match="after its lease"):
        model.run({"x": np.zeros((1, 8), np.float32)})


def test_double_refuses_bad_plans_like_tensorrt(sim_cache):
    plan = trt_double.make_plan()
    for name, data in [("garbage", b"x" * 100), ("truncated", plan[:-10]),
                       ("old", trt_double.make_plan(version="9.0.0"))]:
        sim_cache.register(name, data, backend="tensorrt", trt_module=trt_double)
        with pytest.raises(mc.EngineDeserializationError) as err:
            with sim_cache.use(name):
                pass
        assert "Error Code 1" in str(err.value)
    assert sim_cache.sim.process_bytes() == 0


def test_incompatible_plan_is_rebuilt_from_its_onnx(tmp_path, onnx_path, monkeypatch):
    plan_path, sidecar, _ = BuildCache(str(tmp_path / "plans"), trt_double, facts={}).get(
        onnx_path, {"profiles": PROFILE})
    assert sidecar["trt_version"] == "10.99.0" and sidecar["onnx_path"] == os.path.abspath(onnx_path)
    monkeypatch.setattr(trt_double, "__version__", "10.100.0")      # a later process, TensorRT upgraded
    device = mc.SimulatedDevice("64MiB")
    with mc.ModelCache(monitor=device, reserve=0, disk_dir=str(tmp_path / "disk"), watch_interval=None) as cache:
        cache.register("m", plan_path, backend="tensorrt", trt_module=trt_double)
        x = np.ones((2, 64), np.float32)
        with cache.use("m") as model:
            np.testing.assert_array_equal(model.run({"x": x})["y"], 2 * x)
        stats = cache.stats()
        assert stats["tensorrt.rebuilds"] == 1 and trt_double.STATS["build"] == 2
        assert cache.info("m").details["built_for"]["trt_version"] == "10.100.0"


def test_auto_detection_and_environment(sim_cache, tmp_path):
    path = tmp_path / "model.plan"
    path.write_bytes(trt_double.make_plan())
    sim_cache.register("auto", str(path), trt_module=trt_double)
    with sim_cache.use("auto") as model:
        run_and_check(model)
    assert sim_cache.info("auto").backend == "tensorrt"
    env = environment(trt_double)
    assert env["trt_module"] == trt_double.__name__ and env["trt_version"] == trt_double.__version__
    assert env["gpu_name"] is None

