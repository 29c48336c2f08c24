import contextlib
import os
import threading

import numpy as np
import pytest

import modelcache as mc

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from modelcache.backends.onnxruntime import InvalidModelError  # noqa: E402
from modelcache import ModelInputError  # noqa: E402
from modelcache.tools.generate import make_mlp, save_model  # noqa: E402
from conftest import run_threads  # noqa: E402

HIDDEN = 512          # 1 MiB per weight matrix: at the default threshold
X = np.random.default_rng(7).standard_normal((3, HIDDEN)).astype(np.float32)
# Weights mode feeds weights as inputs; ONNX Runtime's CPU kernels pre-pack constant weights and sum
# in another order, so on the CPU the two agree to float rounding, not bit for bit.
RTOL, ATOL = 1e-5, 1e-6
MiB = 1 << 20


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    proto = make_mlp(HIDDEN, 3, seed=1)
    plain = save_model(proto, str(folder / "plain.onnx"))
    external = save_model(make_mlp(HIDDEN, 3, seed=1), str(folder / "external.onnx"), external_data=True)
    reference = ort.InferenceSession(plain, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    return {"plain": plain, "external": external, "reference": reference, "folder": folder}


@pytest.fixture
def cache(tmp_path):
    device = mc.SimulatedDevice("256MiB")
    with mc.ModelCache(monitor=device, reserve=0, disk_dir=str(tmp_path / "disk"), watch_interval=None) as c:
        c.device_sim = device
        yield c


LOADERS = {
    "path": lambda f: f["plain"],
    "external-data path": lambda f: f["external"],
    "bytes": lambda f: open(f["plain"], "rb").read(),
    "ModelProto": lambda f: onnx.load(f["external"]),
    "InferenceSession": lambda f: ort.InferenceSession(f["external"], providers=["CPUExecutionProvider"]),
}


@pytest.mark.parametrize("form", list(LOADERS))
@pytest.mark.parametrize("mode", ["auto", "session"])
def test_every_loader_form_and_mode_matches_plain_session(cache, model_files, form, mode):
    value = LOADERS[form](model_files)
    cache.register("m", lambda: value, backend="auto" if form != "bytes" else "onnxruntime",
                   **({} if mode == "auto" else {"mode": mode}))
    expected = model_files["reference"]
    for cycle, tier in enumerate([mc.Tier.HOST, mc.Tier.DISK, mc.Tier.UNLOADED, mc.Tier.HOST, mc.Tier.DISK]):
        with cache.use("m") as model:
            got = model.run(["y"], {"x": X})[0]
            info = cache.info("m")
            assert info.backend == "onnxruntime" and info.tier is mc.Tier.DEVICE
            if info.details["mode"] == "weights":
                np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
            else:
                np.testing.assert_array_equal(got, expected)
            assert info.details["mode"] == ("weights" if mode == "auto" else "session")
            assert info.device_bytes >= 3 * HIDDEN * HIDDEN * 4
            assert cache.device_sim.process_bytes() == info.device_bytes
        cache.evict("m", tier=tier)
        assert cache.info("m").tier is tier and cache.device_sim.process_bytes() == 0


def test_weights_mode_bytes_and_reason(cache, model_files):
    cache.register("m", model_files["plain"])
    with cache.use("m"):
        info = cache.info("m")
    assert info.details["mode"] == "weights" and "match" in info.details["mode_reason"]
    # the 1 MiB matrices, and (so that fine-tunes of one architecture can share a session) the
    # 2 KiB float biases; each starts at a 256 B boundary
    assert info.details["weights"] == 6 and info.details["weights_bytes"] == 3 * HIDDEN * HIDDEN * 4 + 3 * HIDDEN * 4
    assert info.device_bytes == info.details["weights_bytes"]    # exact buffer sizes, no session overhead on CPU
    assert cache.info("m").host_bytes >= info.details["weights_bytes"]  # the host copy stays (pinned on a GPU)


def test_small_model_runs_in_session_mode(cache, tmp_path):
    path = save_model(make_mlp(32, 2), str(tmp_path / "small.onnx"))
    cache.register("small", path)
    with cache.use("small") as model:
        out = model.run(None, {"x": np.ones((2, 32), np.float32)})[0]
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((2, 32), np.float32)})[0]
    np.testing.assert_array_equal(out, want)
    assert cache.info("small").details["mode"] == "session"
    assert "threshold" in cache.info("small").details["mode_reason"]


def test_weights_threshold_option(cache, tmp_path):
    path = save_model(make_mlp(32, 2), str(tmp_path / "small.onnx"))
    cache.register("small", path, weights_threshold=1024)
    with cache.use("small") as model:
        model.run(None, {"x": np.ones((2, 32), np.float32)})
    details = cache.info("small").details    # 2 matrices of 4 KiB, and their 128 B biases (shared sessions:
    assert details["mode"] == "weights" and details["weights"] == 4   # fine-tunes differ in biases too)
    cache.register("alone", path, weights_threshold=1024, share_session=False)
    with cache.use("alone") as model:
        model.run(None, {"x": np.ones((2, 32), np.float32)})
    assert cache.info("alone").details["weights"] == 2     # its own session: only what the threshold says


def test_rewrite_that_changes_results_falls_back_to_session(cache, model_files, monkeypatch):
    import modelcache.backends.onnxruntime.graph as backend_module
    real = backend_module.as_inputs

    def wrong_rewrite(proto, weights, **kw):   # a rewrite that breaks the model's meaning: y becomes -y
        output = proto.graph.output[0].name
        for node in proto.graph.node:
            node.output[:] = [o if o != output else output + "_before" for o in node.output]
        proto.graph.node.append(onnx.helper.make_node("Neg", [output + "_before"], [output]))
        return real(proto, weights, **kw)

    monkeypatch.setattr(backend_module, "as_inputs", wrong_rewrite)
    cache.register("auto", model_files["plain"])
    with cache.use("auto") as model:
        np.testing.assert_array_equal(model.run(None, {"x": X})[0], model_files["reference"])
    info = cache.info("auto")
    assert info.details["mode"] == "session" and "differs" in info.details["mode_reason"]
    cache.register("forced", model_files["plain"], mode="weights")
    with pytest.raises(InvalidModelError, match="forced"):
        with cache.use("forced"):
            pass


def test_rewrite_that_onnxruntime_rejects_falls_back(cache, model_files, monkeypatch):
    import modelcache.backends.onnxruntime.graph as backend_module
    real = backend_module.as_inputs

    def broken(proto, weights, **kw):
        proto.graph.node[0].op_type = "NoSuchOp"
        return real(proto, weights, **kw)

    monkeypatch.setattr(backend_module, "as_inputs", broken)
    cache.register("m", model_files["plain"])
    with cache.use("m"):
        pass
    assert "fails on ONNX Runtime" in cache.info("m").details["mode_reason"]


def test_serving_on_host_while_evicted(cache, model_files):
    cache.register("m", model_files["plain"])
    cache.prefetch("m", tier=mc.Tier.HOST).result(30)
    assert cache.info("m").tier is mc.Tier.HOST
    with cache.use("m", allow_host=True) as model:
        assert model.get_providers() == ["CPUExecutionProvider"]
        np.testing.assert_allclose(model.run(None, {"x": X})[0], model_files["reference"], rtol=RTOL, atol=ATOL)
        with pytest.raises(mc.ModelInUseError):
            cache.evict("m", tier=mc.Tier.DISK)     # the host lease holds it on the host
    for _ in range(200):                             # the swap-in started in the background
        if cache.info("m").tier is mc.Tier.DEVICE:
            break
        threading.Event().wait(0.01)
    assert cache.info("m").tier is mc.Tier.DEVICE
    assert cache.stats()["host_serves"] == 1
    cache.evict("m")
    with cache.use("m") as model:                    # without allow_host: waits for the device
        assert cache.info("m").tier is mc.Tier.DEVICE
    cache.register("s", model_files["plain"], mode="session")   # session mode serves on host only if asked
    cache.prefetch("s", tier=mc.Tier.HOST).result(30)
    with cache.use("s", allow_host=True):
        assert cache.info("s").tier is mc.Tier.DEVICE


def test_device_fast_path_binding(cache, model_files):
    cache.register("m", model_files["plain"])
    with cache.use("m") as model:
        binding = model.io_binding()
        binding.bind_cpu_input("x", X)
        binding.bind_output("y")
        model.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()[0]
    np.testing.assert_allclose(out, model_files["reference"], rtol=RTOL, atol=ATOL)
    assert [i.name for i in model.get_inputs()] == ["x"]     # weights are not user inputs
    with pytest.raises(mc.ModelCacheError, match="after its lease"):
        cache.evict("m")
        model.run(None, {"x": X})




def test_a_runs_outputs_stay_its_own_after_later_runs_and_evictions(cache, model_files):
    """Outputs are ONNX Runtime's buffers (no copy): the pooled binding's later runs, and the
    model's eviction, leave earlier outputs as they were."""
    cache.register("m", model_files["plain"])
    rng = np.random.default_rng(3)
    feeds = [rng.standard_normal((3, HIDDEN)).astype(np.float32) for _ in range(6)]
    plain = ort.InferenceSession(model_files["plain"], providers=["CPUExecutionProvider"])
    expected = [plain.run(None, {"x": f})[0] for f in feeds]
    assert np.std(expected[0]) > 0 and not np.allclose(expected[0], expected[1])
    kept = []
    with cache.use("m") as model:
        assert cache.info("m").details["mode"] == "weights"
        for f in feeds:
            out = model.run(None, {"x": f})[0]
            assert out.flags.writeable and out.flags.c_contiguous
            kept.append(out)
    cache.evict("m", tier=mc.Tier.DISK)
    with cache.use("m") as model:          # a new residency, a new binding over other buffers
        model.run(None, {"x": feeds[0]})
    for got, want in zip(kept, expected):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert len({o.ctypes.data for o in kept}) == len(kept)     # no two runs share an output buffer


@pytest.mark.parametrize("path", ["pybind", "public wrappers"])
def test_runs_through_onnx_runtimes_pybind_objects_or_its_public_wrappers_agree(cache, model_files, monkeypatch,
                                                                                 path):
    """A run binds and runs through ONNX Runtime's pybind objects where its Python wrappers have
    them; an ONNX Runtime without them is run through the wrappers, with the same results."""
    from modelcache.backends.onnxruntime import model as model_module
    if path == "public wrappers":
        monkeypatch.setattr(model_module, "_raw_cpu_device", lambda: None)
    cache.register("m", model_files["plain"])
    with cache.use("m") as model:
        for _ in range(3):      # the first binding made, then the pooled one again
            np.testing.assert_allclose(model.run(None, {"x": X})[0], model_files["reference"], rtol=RTOL, atol=ATOL)
        kinds = {type(binding).__name__ for binding, _ in model._bindings}
    assert kinds == ({"_PublicBinding"} if path == "public wrappers" else {"SessionIOBinding"})


def test_a_model_with_a_sequence_output_runs_in_session_mode_and_says_why(cache, tmp_path):
    """Weights mode binds tensors only: a sequence output sends the model to session mode, with
    its type in the reason and in ``get_outputs()``."""
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(4).standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("SequenceConstruct", ["h", "r"], ["s"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, HIDDEN])],
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [3, HIDDEN])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "seq.onnx")
    onnx.save(model, path)
    plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    expected = plain.run(None, {"x": X})
    cache.register("seq", path)
    with cache.use("seq") as m:
        got = m.run(None, {"x": X})
        assert [(o.name, o.type) for o in m.get_outputs()] == [(o.name, o.type) for o in plain.get_outputs()]
    details = cache.info("seq").details
    assert details["mode"] == "session" and "s: seq(tensor(float))" in details["mode_reason"]
    assert isinstance(got[0], list) and len(got[0]) == 2
    np.testing.assert_array_equal(got[0][1], expected[0][1])
    np.testing.assert_array_equal(got[1], expected[1])


def test_malformed_missing_data_and_bad_inputs_are_typed(cache, model_files, tmp_path):
    cache.register("good", model_files["plain"])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    cache.register("garbage", str(garbage))
    missing = tmp_path / "missing.onnx"
    save_model(make_mlp(HIDDEN, 2), str(missing), external_data=True)
    os.unlink(str(missing) + ".data")
    cache.register("missing", str(missing))
    cache.register("nofile", str(tmp_path / "nope.onnx"))
    for name in ["garbage", "missing", "nofile"]:
        with pytest.raises(InvalidModelError) as err:
            with cache.use(name):
                pass
        assert repr(name) in str(err.value) and isinstance(err.value, mc.ModelCacheError)
        assert cache.info(name).tier is mc.Tier.UNLOADED
    with cache.use("good") as model:
        with pytest.raises(ModelInputError, match="unknown \\['input'\\]") as err:
            model.run(None, {"input": X})
        assert "'good'" in str(err.value) and not isinstance(err.value, ValueError)   # modelcache's only
        with pytest.raises(ModelInputError, match="missing"):
            model.run(None, {})
        with pytest.raises(ModelInputError, match="unknown output"):
            model.run(["z"], {"x": X})
        np.testing.assert_allclose(model.run(None, {"x": X})[0], model_files["reference"], rtol=RTOL, atol=ATOL)
    with pytest.raises(mc.ConfigError, match="mode='fast'"):
        cache.register("badmode", model_files["plain"], mode="fast")
        with cache.use("badmode"):
            pass


def test_disk_tier_is_atomic_and_checked(cache, model_files):
    cache.register("m", model_files["plain"])
    info = cache.prefetch("m", tier=mc.Tier.HOST).result(30)
    info = cache.evict("m", tier=mc.Tier.DISK)
    folder = os.path.dirname(info.disk_path)
    names = sorted(os.listdir(folder))
    assert len(names) == 2 and not any(n.startswith(".tmp") for n in names)
    weights = [os.path.join(folder, n) for n in names if n.endswith(".weights")][0]
    assert os.path.getsize(weights) == 3 * HIDDEN * HIDDEN * 4 + 3 * HIDDEN * 4   # matrices and biases
    with open(weights, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xff\xff\xff")
    with cache.use("m") as model:      # the damaged file is dropped and the loader reads the original again
        np.testing.assert_allclose(model.run(None, {"x": X})[0], model_files["reference"], rtol=RTOL, atol=ATOL)
    info = cache.info("m")
    assert "sha256" in info.last_error and info.loads == 2 and not os.path.exists(weights)


def test_concurrent_runs_and_evictions_stay_correct(model_files, tmp_path):
    device = mc.SimulatedDevice("64MiB")
    one = 3 * HIDDEN * HIDDEN * 4
    with mc.ModelCache(monitor=device, device_budget=2 * one, reserve=0, watch_interval=None) as cache:
        for i in range(4):
            cache.register(f"m{i}", model_files["plain"], **({"mode": "session"} if i % 2 else {}))
        errors = []

        def worker(seed):
            rng = np.random.default_rng(seed)
            for _ in range(15):
                name = f"m{rng.integers(4)}"
                try:
                    with cache.use(name, timeout=60) as model:
                        got = model.run(None, {"x": X})[0]
                    np.testing.assert_allclose(got, model_files["reference"], rtol=RTOL, atol=ATOL)
                except Exception as exc:
                    errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:2]
        assert device.peak_process_bytes <= 2 * one
        assert cache.stats()["evictions"] > 0


@pytest.mark.parametrize("mode", ["weights", "session"])
def test_weights_not_a_multiple_of_the_alignment_survive_every_tier(cache, tmp_path, mode):
    """700 x 700 float32 = 1 960 000 B, not a multiple of the 256 B alignment of the host block."""
    path = save_model(make_mlp(700, 3, seed=4), str(tmp_path / "odd.onnx"), external_data=True)
    x = np.random.default_rng(1).standard_normal((2, 700)).astype(np.float32)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cache.register("odd", path, mode=mode)
    for tier in [mc.Tier.HOST, mc.Tier.DISK, mc.Tier.HOST]:
        with cache.use("odd") as model:
            np.testing.assert_allclose(model.run(None, {"x": x})[0], expected, rtol=RTOL, atol=ATOL)
        cache.evict("odd", tier=tier)


# session groups: models of one architecture share one session ----------------------------------
def _mlp(folder, hidden, seed, layers=2):
    path = save_model(make_mlp(hidden, layers, seed=seed), str(folder / f"mlp{hidden}x{layers}-{seed}.onnx"))
    x = np.random.default_rng(seed).standard_normal((2, hidden)).astype(np.float32)
    y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return path, x, y


def _serve_checked(cache, models, after=None):
    """Run every model once on its input and compare with the plain session's output."""
    for name, (_, x, y) in models.items():
        with cache.use(name) as model:
            np.testing.assert_allclose(model.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        if after is not None:
            after(name)


def _budget_to(cache, nbytes):
    """Tighten the cache's device budget to ``nbytes`` (a test's way to make room scarce)."""
    cache.device_budget_bytes = cache._ledger.device_budget = nbytes


def _recorded_moves(cache):
    """The cache's swap-ins and evictions from now on, in order: ("in", model) or (reason, model)."""
    moves = []
    cache.on("swap_in", lambda e: moves.append(("in", e.model)))
    cache.on("eviction", lambda e: moves.append((e.reason, e.model)))
    return moves


def _two_architectures_served(cache, tmp_path):
    """Register two MLPs of other widths ("a", "b": two session groups) and serve each once."""
    models = {"a": _mlp(tmp_path, 256, 1), "b": _mlp(tmp_path, 384, 2)}
    for name, (path, _, _) in models.items():
        cache.register(name, path, weights_threshold=4096, caller_threads=1)
    _serve_checked(cache, models)
    return models


def test_models_of_one_architecture_share_one_session_counted_once(tmp_path):
    """Same graph and shapes, other weights (fine-tunes): one session, its bytes counted once, every
    output right; another size or architecture gets its own; the session goes with its last model."""
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB")
    models = {"a": _mlp(tmp_path, 256, 1), "b": _mlp(tmp_path, 256, 2), "c": _mlp(tmp_path, 256, 3),
              "wide": _mlp(tmp_path, 384, 5), "deep": _mlp(tmp_path, 256, 4, layers=3)}
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        for name, (path, _, _) in models.items():
            cache.register(name, path, weights_threshold=4096)
        for _ in range(2):
            _serve_checked(cache, models)
        stats = cache.stats()
        assert stats["onnxruntime.sessions"] == 3 and stats["onnxruntime.sessions.created"] == 3
        assert [cache.info(n).details["session_shared_by"] for n in models] == [3, 3, 3, 1, 1]
        weights = sum(cache.info(n).details["weights_bytes"] for n in models)
        assert stats["device.bytes"] == stats["device.accounted_bytes"] == weights + 3 * MiB
        assert device.process_bytes() == weights + 3 * MiB
        cache.evict("a")                      # the owner leaves the device: the bytes stay counted
        assert cache.stats()["device.bytes"] == weights - cache.info("a").details["weights_bytes"] + 3 * MiB
        cache.unregister("a")                 # the next member carries them
        cache.unregister("b")
        assert cache.stats()["onnxruntime.sessions"] == 3
        assert cache.stats()["device.accounted_bytes"] == device.process_bytes()
        cache.unregister("c")
        assert cache.stats()["onnxruntime.sessions"] == 2
        cache.unregister("wide")
        cache.unregister("deep")
        assert cache.stats()["onnxruntime.sessions"] == 0 and device.process_bytes() == 0


def test_share_session_false_gives_each_model_its_own_session(tmp_path):
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB")
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        for name, seed in (("a", 1), ("b", 2)):
            path, x, y = _mlp(tmp_path, 256, seed)
            cache.register(name, path, share_session=False, weights_threshold=4096)
            with cache.use(name) as model:
                np.testing.assert_allclose(model.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        assert cache.stats()["onnxruntime.sessions"] == 2
        assert device.process_bytes() == cache.stats()["device.accounted_bytes"]


def test_a_lone_parked_session_is_unparked_to_make_room(tmp_path):
    """Sessions of architectures with one model each, parked, fill the budget: the planner
    drops one to bring a model in, and the accounting matches the device throughout."""
    device = mc.SimulatedDevice("64MiB", session_overhead="2MiB")
    models = {f"m{k}": _mlp(tmp_path, 128, k, layers=2 + k) for k in range(4)}   # 4 architectures
    with mc.ModelCache(monitor=device, device_budget="6MiB", reserve=0, watch_interval=None) as cache:
        for name, (path, _, _) in models.items():
            cache.register(name, path, weights_threshold=4096)

        def budget_kept(_name):
            stats = cache.stats()
            assert stats["device.accounted_bytes"] <= 6 * MiB
            assert device.process_bytes() == stats["device.accounted_bytes"]

        for _ in range(3):
            _serve_checked(cache, models, after=budget_kept)
        assert cache.stats()["unparks"] > 0
        assert cache.stats()["onnxruntime.sessions.created"] > 4      # dropped sessions were made again


def test_group_session_created_once_under_concurrent_swap_ins(tmp_path):
    device = mc.SimulatedDevice("256MiB", session_overhead="1MiB")
    models = {f"m{k}": _mlp(tmp_path, 256, k) for k in range(6)}
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        for name, (path, _, _) in models.items():
            cache.register(name, path, weights_threshold=4096)
            cache.prefetch(name, tier=mc.Tier.HOST).result()
        errors = []
        barrier = threading.Barrier(len(models))

        def work(name):
            _, x, y = models[name]
            try:
                barrier.wait()
                with cache.use(name) as model:
                    np.testing.assert_allclose(model.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        run_threads(work, [(n,) for n in models])
        assert not errors
        assert cache.stats()["onnxruntime.sessions.created"] == 1
        assert device.process_bytes() == cache.stats()["device.accounted_bytes"]


def test_external_data_outside_the_model_folder_or_too_short_is_refused(cache, tmp_path):
    """Weights in external-data files are read straight into the host block: a location that
    leaves the model's folder, or a file shorter than the weights, is a typed error."""
    proto = make_mlp(HIDDEN, 2, seed=3)
    path = save_model(proto, str(tmp_path / "m" / "m.onnx"), external_data=True)
    escaped = onnx.load(path, load_external_data=False)
    for init in escaped.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    onnx.save_model(escaped, str(tmp_path / "m" / "escaped.onnx"))
    with open(path + ".data", "r+b") as f:
        f.truncate(HIDDEN * HIDDEN * 4 // 2)
    for name, file in (("escaped", "escaped.onnx"), ("short", "m.onnx")):
        cache.register(name, str(tmp_path / "m" / file))
        with pytest.raises(InvalidModelError, match=name):
            with cache.use(name):
                pass
    cache.register("fine", save_model(make_mlp(HIDDEN, 2, seed=4), str(tmp_path / "f.onnx"), external_data=True))
    with cache.use("fine") as model:
        assert model.run(None, {"x": X})[0].shape == (3, HIDDEN)


def test_a_model_folder_of_links_loads(cache, tmp_path):
    """A Hugging Face cache snapshot links each file to a blob elsewhere: the model and its external
    data are links, and the weights read through them are the model's own."""
    proto = make_mlp(HIDDEN, 2, seed=5)
    path = save_model(proto, str(tmp_path / "blobs" / "m.onnx"), external_data=True)
    (tmp_path / "snapshot").mkdir()
    for f in ("m.onnx", "m.onnx.data"):
        os.symlink(str(tmp_path / "blobs" / f), str(tmp_path / "snapshot" / f))
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    assert np.std(expected) > 0
    cache.register("linked", str(tmp_path / "snapshot" / "m.onnx"))
    with cache.use("linked") as model:
        np.testing.assert_allclose(model.run(None, {"x": X})[0], expected, rtol=RTOL, atol=ATOL)


def test_shared_session_model_reports_the_original_inputs_and_outputs(tmp_path):
    """The shared graph's dimensions are symbolic; what use() hands out still describes the
    model's own inputs and outputs, as a plain InferenceSession does."""
    path, x, _ = _mlp(tmp_path, 256, 1)
    fixed = save_model(make_mlp(256, 2, seed=2, batch=3), str(tmp_path / "fixed.onnx"))
    with mc.ModelCache(monitor=mc.SimulatedDevice("64MiB"), reserve=0, watch_interval=None) as cache:
        for name, source in (("a", path), ("fixed", fixed)):
            cache.register(name, source, weights_threshold=4096)
            plain = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
            with cache.use(name) as model:
                assert cache.info(name).details["session_shared_by"] >= 1
                for got, want in ((model.get_inputs(), plain.get_inputs()), (model.get_outputs(), plain.get_outputs())):
                    assert [(v.name, v.type, list(v.shape)) for v in got] == \
                        [(v.name, v.type, list(v.shape)) for v in want]


def test_a_session_made_again_lets_other_models_run_meanwhile(tmp_path):
    """A session's first creation is measured alone (runs wait: about a second on a GPU); made
    again after it was freed, it is charged as measured then, and other models run meanwhile."""
    path_a, xa, ya = _mlp(tmp_path, 256, 1)
    path_b = save_model(make_mlp(128, 2, seed=9), str(tmp_path / "b.onnx"))
    xb = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    yb = ort.InferenceSession(path_b, providers=["CPUExecutionProvider"]).run(None, {"x": xb})[0]
    assert np.std(yb) > 0
    with mc.ModelCache(monitor=mc.SimulatedDevice("64MiB", session_overhead="1MiB"), reserve=0,
                       watch_interval=None) as cache:
        cache.register("a", path_a, weights_threshold=4096)
        cache.register("b", path_b, weights_threshold=4096)
        for name in ("a", "b"):
            with cache.use(name):
                pass
        measured = cache.info("a").details["session_device_bytes"]
        cache.evict("a")
        cache._moves.begin_locked(cache._entries["a"], mc.Tier.HOST)   # unpark: a's session goes
        cache._moves.down(cache._entries["a"], "explicit")
        sessions = cache._entries["a"].backend.sessions
        create, started, release = sessions.create, threading.Event(), threading.Event()

        def slow_create(*args, **kwargs):
            started.set()
            assert release.wait(10)
            return create(*args, **kwargs)
        sessions.create = slow_create
        results = []

        def use_a():
            with cache.use("a") as model:
                results.append(model.run(None, {"x": xa})[0])
        thread = threading.Thread(target=use_a)
        thread.start()
        try:
            assert started.wait(10)
            done = threading.Event()

            def use_b():
                with cache.use("b") as model:
                    results.append(model.run(None, {"x": xb})[0])
                done.set()
            threading.Thread(target=use_b, daemon=True).start()
            assert done.wait(5), "b's run waited for a's session to be made"
        finally:
            release.set()
            thread.join(10)
        np.testing.assert_allclose(results[0], yb, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(results[1], ya, rtol=RTOL, atol=ATOL)
        assert cache.info("a").details["session_device_bytes"] == measured
        assert cache.stats()["onnxruntime.sessions.created"] == 3


def test_a_failed_warm_up_run_is_reported_and_the_model_still_serves(tmp_path):
    path, x, y = _mlp(tmp_path, 256, 1)
    with mc.ModelCache(monitor=mc.SimulatedDevice("64MiB"), reserve=0, watch_interval=None) as cache:
        cache.register("a", path, weights_threshold=4096)
        with cache.use("a"):            # the first swap-in checks the model; its session warms up fine
            pass
        assert cache.info("a").details["session_warmup_error"] is None
        cache.evict("a")
        cache._moves.begin_locked(cache._entries["a"], mc.Tier.HOST)   # unpark: the session goes
        cache._moves.down(cache._entries["a"], "explicit")
        assert cache.stats()["onnxruntime.sessions"] == 0
        cache._entries["a"].handle.sample_feed = {"x": np.zeros((1, 7), np.float32)}   # a shape it refuses
        with cache.use("a") as model:   # the session is made again; its warm-up run fails
            np.testing.assert_allclose(model.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        assert "x" in cache.info("a").details["session_warmup_error"]


def test_a_session_estimate_beyond_the_budget_does_not_make_a_model_too_large(tmp_path, monkeypatch):
    """On a GPU an unmeasured session is planned at 128 MiB; a small model under a small budget
    must still load (found by `modelcache demo` on the H100: a 2.8 MiB model was refused as
    needing 137.8 MiB). Only the weights, which are certain, can make a model too large."""
    from modelcache.backends.onnxruntime.weights_mode import WeightsMode
    monkeypatch.setattr(WeightsMode, "_session_estimate", lambda self: 64 << 20)   # far beyond the budget
    path = save_model(make_mlp(256, 2, batch=1), str(tmp_path / "small.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    reference = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert reference.std() > 0
    device = mc.SimulatedDevice("1GiB", session_overhead="64KiB")
    with mc.ModelCache(monitor=device, device_budget="4MiB", reserve=0, watch_interval=None) as cache:
        cache.register("small", path, weights_threshold=1024)
        with cache.use("small") as model:
            np.testing.assert_allclose(model.run(None, {"x": x})[0], reference, rtol=1e-5, atol=1e-6)
        assert cache.info("small").details["mode"] == "weights"
        cache.register("big", save_model(make_mlp(1024, 2, batch=1), str(tmp_path / "big.onnx")),
                       weights_threshold=1024)            # 8 MiB of weights: too large for certain
        with pytest.raises(mc.ModelTooLargeError, match="whole budget"):
            cache.use("big").acquire()


def test_caller_threads_run_their_models_themselves_and_are_counted(tmp_path, monkeypatch):
    """caller_threads=2: the first two threads that run models of an architecture run them on their
    own thread (the measured state of each counted with the session's bytes); a third thread hands
    its runs to the session's runner; outputs stay right; the state goes with the session."""
    from modelcache.devices.base import InlineRunner
    from modelcache.backends.onnxruntime import callers as callers_module
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", thread_overhead="256KiB")
    handed = []

    class CountingRunner(InlineRunner):         # the simulated device's runner, counting hand-offs
        def call(self, fn, *args):
            handed.append(threading.get_ident())
            return fn(*args)
    monkeypatch.setattr(type(device.memory), "new_runner", lambda self, label: CountingRunner())
    measured = []
    real_join = callers_module.CallerThreads.join

    def join(self, fn, args):                  # which threads became caller threads
        ran, result = real_join(self, fn, args)
        if ran:
            measured.append(threading.get_ident())
        return ran, result
    monkeypatch.setattr(callers_module.CallerThreads, "join", join)
    models = {"a": _mlp(tmp_path, 256, 1), "b": _mlp(tmp_path, 256, 2)}
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        for name, (path, _, _) in models.items():
            cache.register(name, path, weights_threshold=4096, caller_threads=2)
            with cache.use(name):                # swap-in and warm-up (on the runner); no run here
                pass
        handed.clear()
        weights = sum(cache.info(n).details["weights_bytes"] for n in models)
        before = cache.stats()["device.accounted_bytes"]
        assert before == device.process_bytes()
        finish = threading.Event()

        def serve(done):
            for _ in range(3):
                _serve_checked(cache, models)
            done.set()
            finish.wait(10)                      # alive until the end: thread ids are not reused
        threads = []
        for _ in range(3):                       # three threads, one after another
            done = threading.Event()
            threads.append(threading.Thread(target=serve, args=(done,)))
            threads[-1].start()
            assert done.wait(30)
        assert len(measured) == 2 and len(set(measured)) == 2          # two became caller threads
        third = set(handed)
        assert len(third) == 1 and not third & set(measured)            # the third handed its runs over
        assert len(handed) == 3 * len(models)
        stats = cache.stats()
        assert stats["device.accounted_bytes"] == before + 2 * 256 * 1024 == device.process_bytes()
        assert weights < before
        details = cache.info("a").details                               # and info() says so
        assert details["caller_threads"] == 2 and details["caller_threads_bytes"] == 2 * 256 * 1024
        finish.set()
        for thread in threads:
            thread.join()
        with pytest.raises(mc.ConfigError, match="caller_threads"):
            cache.register("bad", models["a"][0], caller_threads=-1)
            cache.prefetch("bad")
            with cache.use("bad"):
                pass
        cache.unregister("a")
        cache.unregister("b")
        assert device.process_bytes() == 0


def test_runs_on_a_caller_thread_and_the_runner_each_count_their_working_memory(tmp_path, monkeypatch):
    """A run on a caller thread and one on the session's runner can be in flight at once (found on
    the H200: the zoo stress peaked at 1.1-1.2x its budget): each books its working memory on the
    device, and the cache plans for both while the architecture is resident."""
    from modelcache.backends.onnxruntime import model as model_module
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", run_overhead="2MiB")
    path, x, y = _mlp(tmp_path, 256, 1)
    both_in = threading.Barrier(2, timeout=10)
    booked = []
    real = model_module.OrtModel._bind_and_run

    def bind_and_run(self, *args):
        if not both_in.broken:
            try:
                both_in.wait()                       # the two runs are in flight together here
                booked.append(device.process_bytes())
            except threading.BrokenBarrierError:
                pass
        return real(self, *args)
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        cache.register("a", path, weights_threshold=4096, caller_threads=1)
        with cache.use("a") as m:                     # the caller thread: this one
            np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        monkeypatch.setattr(model_module.OrtModel, "_bind_and_run", bind_and_run)
        idle = device.process_bytes()
        accounted = cache.stats()["device.accounted_bytes"]
        outputs = []

        def serve():
            with cache.use("a") as m:
                outputs.append(m.run(None, {"x": x})[0])
        other = threading.Thread(target=serve)      # the test thread is the caller thread: this one hands over
        with cache.use("a") as m:
            other.start()
            outputs.append(m.run(None, {"x": x})[0])
        other.join(10)
        both_in.abort()
        assert len(outputs) == 2 and all(np.allclose(o, y, rtol=RTOL, atol=ATOL) for o in outputs)
        assert len(booked) == 2 and max(booked) == idle + 2 * 2 * MiB     # two runs' working memory at once
        assert accounted >= max(booked)                                   # and planned for


def test_a_parked_session_keeps_its_runs_working_memory_until_the_arena_gives_it_back(tmp_path, monkeypatch):
    """ONNX Runtime's shared arena keeps what runs allocated after they end (on the H200 the zoo
    stress peaked 6-7 % over its budget while the books held it): a parked architecture's runs'
    working memory stays counted until the arena is shrunk, which the cache asks for before it
    evicts a model or drops a session for room, and which happens when a session goes."""
    from modelcache.backends.onnxruntime import sessions as sessions_module
    shrinks = []
    real = sessions_module.Sessions.shrink_arena
    monkeypatch.setattr(sessions_module.Sessions, "shrink_arena", lambda self: (shrinks.append(1), real(self))[1])
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", run_overhead="2MiB")
    path_a, x, y = _mlp(tmp_path, 256, 1)
    path_b, xb, yb = _mlp(tmp_path, 384, 2)
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None, disk_dir=str(tmp_path / "disk")) as cache:
        cache.register("a", path_a, weights_threshold=4096, caller_threads=1)
        cache.register("b", path_b, weights_threshold=4096, caller_threads=1)
        with cache.use("a") as m:
            np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        details = cache.info("a").details
        working = details["working_bytes"] * 2            # the runner's run and the caller thread's
        assert working == 4 * MiB
        resident = cache.stats()["device.accounted_bytes"]
        cache.evict("a")
        assert cache.info("a").tier is mc.Tier.HOST
        assert cache.stats()["device.parked_bytes"] == details["session_device_bytes"] + working
        assert cache.stats()["device.accounted_bytes"] == resident - details["weights_bytes"]
        assert not shrinks
        # room for b within a budget that the parked working memory would exceed: the arena is
        # shrunk first; a's session stays (no model evicted, no session dropped)
        with cache.use("b") as m:
            np.testing.assert_allclose(m.run(None, {"x": xb})[0], yb, rtol=RTOL, atol=ATOL)
        cache.evict("b")
        need_b = cache.info("b").details["weights_bytes"]
        parked = cache.stats()["device.parked_bytes"]
        _budget_to(cache, cache.stats()["device.accounted_bytes"] + need_b - MiB)
        shrinks.clear()
        with cache.use("b") as m:
            np.testing.assert_allclose(m.run(None, {"x": xb})[0], yb, rtol=RTOL, atol=ATOL)
        assert shrinks, "the arena was not shrunk before making room"
        assert cache.stats()["onnxruntime.sessions"] == 2                 # a's session kept
        assert cache.info("a").tier is mc.Tier.HOST and cache.stats()["device.parked_bytes"] < parked
        assert cache.stats()["device.accounted_bytes"] <= cache.device_budget_bytes
        shrinks.clear()
        cache.evict("a", tier=mc.Tier.DISK)                # below the host: a's session goes, and the arena shrinks
        assert shrinks
        with cache.use("a") as m:                          # made again, as measured before
            np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)


def test_a_swap_in_plans_for_working_memory_given_back_before(tmp_path):
    """Once the arena gave a parked architecture's working memory back, that architecture's next
    swap-in takes it again: the swap-in plans for it (found on the H200: the zoo stress's books
    went 17 % over the budget as reclaimed groups came back unplanned)."""
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", run_overhead="2MiB")
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        _, x, y = _two_architectures_served(cache, tmp_path)["a"]
        working = cache.info("a").details["working_bytes"] * 2     # the runner's run and the caller thread's
        assert working == 4 * MiB
        cache.evict("a")
        backend = cache._entries["a"].backend
        assert backend.reclaimable_device_bytes() == working
        backend.reclaim_device_bytes()                  # the arena gave a's working memory back
        assert backend.reclaimable_device_bytes() == 0
        weights = cache.info("a").details["weights_bytes"]
        # room for a's weights, not for its working memory too: b must go
        _budget_to(cache, cache.stats()["device.accounted_bytes"] + weights + working - 1)
        moves = _recorded_moves(cache)
        with cache.use("a") as m:
            np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
            assert cache.stats()["device.accounted_bytes"] <= cache.device_budget_bytes
        assert moves == [("room", "b"), ("in", "a")]       # made room first, not relieved after


def _arena_slack_bytes():
    from modelcache.backends.onnxruntime import weights_mode
    return weights_mode.ARENA_SLACK_BYTES


def test_a_shrink_stops_counting_only_what_the_device_got_back(tmp_path, monkeypatch):
    """On the H200 a shrink of the shared arena gave back 6 of the 152 MiB of working memory the
    books then stopped counting (the arena's regions were held by other allocations): a reclaim
    clears a parked architecture's working memory only as far as the process's reading fell, the
    rest stays counted and is not asked for again until the architecture runs again or a session
    goes (whose shrink may free those regions); a shrink that fails clears nothing."""
    from modelcache.backends.onnxruntime import sessions as sessions_module
    released = [0]

    def shrink(self):
        if isinstance(released[0], Exception):
            raise released[0]
        return released[0]
    monkeypatch.setattr(sessions_module.Sessions, "shrink_arena", shrink)
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", run_overhead="4MiB")
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None, disk_dir=str(tmp_path / "disk")) as cache:
        served = _two_architectures_served(cache, tmp_path)
        working = cache.info("a").details["working_bytes"] * 2
        assert working == 8 * MiB > _arena_slack_bytes()
        cache.evict("a")
        cache.evict("b")
        backend = cache._entries["a"].backend
        assert backend.reclaimable_device_bytes() == backend.soft_device_bytes() == 2 * working
        parked = cache.stats()["device.parked_bytes"]

        def kept():
            groups = {n: cache._entries[n].handle.group for n in served}
            return sorted(n for n, g in groups.items() if g is not None and g.arena_kept)
        released[0] = RuntimeError("the shrink failed")
        with pytest.raises(RuntimeError):
            backend.reclaim_device_bytes()
        assert cache.stats()["device.parked_bytes"] == parked and kept() == ["a", "b"]   # nothing cleared
        assert backend.reclaimable_device_bytes() == 0
        for name, (path, x, y) in served.items():      # they run again: asked for again
            with cache.use(name) as m:
                np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
            cache.evict(name)
        assert kept() == [] and backend.reclaimable_device_bytes() == 2 * working
        released[0] = working - 5 * MiB + working      # enough for one architecture's, not for both
        backend.reclaim_device_bytes()
        assert cache.stats()["device.parked_bytes"] == parked - working      # one cleared, one still counted
        assert backend.reclaimable_device_bytes() == 0                       # and not asked for again
        assert backend.soft_device_bytes() == 0          # known to be held: not "may or may not" (the growth's floor)
        [still] = kept()
        path, x, y = served[still]
        with cache.use(still) as m:                  # it runs again: its working memory may go back later
            np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        cache.evict(still)
        assert kept() == [] and backend.reclaimable_device_bytes() == working
        released[0] = 0
        backend.reclaim_device_bytes()
        assert kept() == [still] and backend.reclaimable_device_bytes() == 0
        other = [n for n in served if n != still][0]
        with cache.use(other):                        # on the device: what its runs left is not b's to claim
            released[0] = working + working
            backend.reclaim_device_bytes()            # kept: none parked to ask
            assert kept() == [still]
        cache.evict(other, tier=mc.Tier.DISK)        # a session goes: what the arena kept is asked for again
        assert kept() == [] and backend.reclaimable_device_bytes() == working
        released[0] = None                            # no reading: cleared as before
        backend.reclaim_device_bytes()
        assert backend.reclaimable_device_bytes() == 0 and kept() == []
        assert cache.stats()["device.accounted_bytes"] <= cache.device_budget_bytes


@contextlib.contextmanager
def _paused_in(monkeypatch, owner, name, action, before=False):
    """Run ``action`` on a thread of its own, held inside ``owner.<name>`` (after the real call,
    or before it with ``before``): the block runs while it is held there."""
    inside, go = threading.Event(), threading.Event()
    real = getattr(owner, name)

    def held(*args):
        if before:
            inside.set()
            go.wait(10)
        result = real(*args)
        if not before:
            inside.set()
            go.wait(10)
        return result
    monkeypatch.setattr(owner, name, held)
    worker = threading.Thread(target=action)
    worker.start()
    assert inside.wait(10)
    try:
        yield
    finally:
        go.set()
        worker.join(10)
        monkeypatch.setattr(owner, name, real)


def _served(cache, name):
    with cache.use(name):
        pass


def test_a_parked_sessions_bytes_stay_counted_while_its_carriers_swap_in_commits(tmp_path, monkeypatch):
    """A parked model carrying its architecture's session swaps in: its reservation answers for the
    weights, its entry for the session, also in the moment between the backend's move and the
    cache's commit (the handle is on the device, the entry not yet): the session was counted
    nowhere then, another swap-in got its room, and the CPU families stress's books went 4-5 %
    over the budget under load."""
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB")
    path, x, y = _mlp(tmp_path, 256, 1)
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        cache.register("a", path, weights_threshold=4096)
        with cache.use("a") as m:
            np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        resident = cache.stats()["device.accounted_bytes"]
        cache.evict("a")
        assert cache.stats()["device.parked_bytes"] == MiB
        backend = type(cache._entries["a"].backend)
        with _paused_in(monkeypatch, backend, "to_device", lambda: _served(cache, "a")):
            assert cache.stats()["device.accounted_bytes"] == resident     # weights and the session
        assert cache.info("a").tier is mc.Tier.DEVICE and cache.stats()["device.accounted_bytes"] == resident
        # and on the way down: the weights gone, the session it keeps still counted before the commit
        with _paused_in(monkeypatch, backend, "to_host", lambda: cache.evict("a")):
            assert cache.stats()["device.accounted_bytes"] == MiB == device.process_bytes()
        assert cache.info("a").tier is mc.Tier.HOST and cache.stats()["device.accounted_bytes"] == MiB


@pytest.mark.parametrize("held_in", ["the backend's move done", "the weights' copy"])
def test_a_swap_in_that_comes_to_carry_the_session_meanwhile_is_counted_with_it(tmp_path, monkeypatch, held_in):
    """b swaps in to join the session a carries (b's room: its weights); before the cache commits
    b (its handle on the device already, or its weights still being copied), a leaves for the
    disk and b becomes the session's carrier: the books count the session with b from then on,
    not nowhere."""
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB")
    models = {"a": _mlp(tmp_path, 256, 1), "b": _mlp(tmp_path, 256, 2)}      # one architecture
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None, disk_dir=str(tmp_path / "disk")) as cache:
        for name, (path, _, _) in models.items():
            cache.register(name, path, weights_threshold=4096)
        _serve_checked(cache, models)
        cache.evict("b")
        assert cache._entries["a"].handle.group.members[0] is cache._entries["a"].handle
        backend = cache._entries["b"].backend
        owner, name, before = ((type(backend), "to_device", False) if held_in == "the backend's move done"
                               else (backend.memory, "copy_to_device", True))
        with _paused_in(monkeypatch, owner, name, lambda: _served(cache, "b"), before=before):
            cache.evict("a", tier=mc.Tier.DISK)      # b carries the session now
            assert cache._entries["b"].handle.group.members[0] is cache._entries["b"].handle
            assert cache.stats()["device.accounted_bytes"] >= device.process_bytes()
        assert cache.stats()["device.accounted_bytes"] == device.process_bytes()


def test_on_a_device_whose_arena_keeps_part_of_what_runs_left_the_books_cover_the_device(tmp_path):
    """A simulated device with an arena that keeps runs' working memory until shrunk and gives
    back half of it then (``arena_keeps=0.5``; on the H200 a shrink gave back 6 of 152 MiB): the
    process's device bytes never exceed the books, before, during and after a reclaim (clearing
    parked architectures' working memory whatever the shrink gave back, the books fell below)."""
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", run_overhead="4MiB", arena_keeps=0.5)
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None, disk_dir=str(tmp_path / "disk")) as cache:
        served = _two_architectures_served(cache, tmp_path)
        _serve_checked(cache, served)        # runs after each thread's first (measured) one: from the arena
        assert device.memory._arena.held > 0

        def covered():
            return device.process_bytes() <= cache.stats()["device.accounted_bytes"]
        assert covered()
        for name in served:
            cache.evict(name)
            assert covered()
        backend = cache._entries["a"].backend
        held = device.process_bytes()
        assert backend.reclaimable_device_bytes() > 0
        backend.reclaim_device_bytes()
        assert device.process_bytes() < held            # the shrink gave some back
        assert covered()
        for name, (path, x, y) in served.items():       # runs take the arena's memory again
            with cache.use(name) as m:
                np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
                assert covered()
        with pytest.raises(ValueError, match="arena_keeps=1.5"):
            mc.SimulatedDevice("1GiB", arena_keeps=1.5)


def test_a_reclaim_does_not_credit_parked_architectures_with_what_resident_ones_gave_back(tmp_path, monkeypatch):
    """The shrink also returns what runs of architectures still on the device left in the arena
    (they keep counting theirs): that share is not taken as a parked one's."""
    from modelcache.backends.onnxruntime import sessions as sessions_module
    released = [0]
    monkeypatch.setattr(sessions_module.Sessions, "shrink_arena", lambda self: released[0])
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", run_overhead="4MiB")
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None, disk_dir=str(tmp_path / "disk")) as cache:
        served = _two_architectures_served(cache, tmp_path)
        working = cache.info("a").details["working_bytes"] * 2
        cache.evict("a")                              # b stays on the device
        backend = cache._entries["a"].backend
        released[0] = working                         # as much as b's runs could have left
        backend.reclaim_device_bytes()
        assert cache._entries["a"].handle.group.arena_kept and cache._entries["a"].handle.group.retained
        released[0] = 2 * working                     # b's and a's
        cache._entries["a"].handle.group.arena_kept = False
        backend.reclaim_device_bytes()
        assert not cache._entries["a"].handle.group.retained
        assert set(served) == {"a", "b"}


def test_a_session_made_again_plans_for_its_first_runs_peak(tmp_path):
    """A session's creation briefly takes more than it keeps (on a GPU its first run searches
    convolution algorithms with workspaces it gives back; the H200 zoo stress peaked 8 % over its
    budget while sessions were made again): the peak is measured at the first creation, and a
    creation again makes room for it before it starts."""
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", run_overhead="2MiB", session_peak="3MiB")
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None, disk_dir=str(tmp_path / "disk")) as cache:
        _, x, y = _two_architectures_served(cache, tmp_path)["a"]
        details = cache.info("a").details
        assert details["session_peak_bytes"] == 3 * MiB - 2 * MiB     # the warm-up run's working memory is planned apart
        cache.evict("a", tier=mc.Tier.DISK)             # its session goes
        assert cache.stats()["onnxruntime.sessions"] == 1
        need = cache._entries["a"].handle.estimated_device_bytes()
        kept = details["weights_bytes"] + details["session_device_bytes"] + details["working_bytes"] * 2
        assert need == kept + 1 * MiB
        # room for what a keeps, not for the peak of its session's making too: b must go first
        _budget_to(cache, cache.stats()["device.accounted_bytes"] + need - 1)
        moves = _recorded_moves(cache)
        with cache.use("a") as m:
            np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        assert moves == [("room", "b"), ("in", "a")]
        assert cache.stats()["onnxruntime.sessions.created"] == 3


def test_runtime_growth_does_not_count_working_memory_the_books_count(tmp_path):
    """The books count an architecture's working memory while the arena may keep it, whether or not
    it holds it now; the floor of what runtimes take on their own is read without it, so a run in
    flight is never counted twice."""
    device = mc.SimulatedDevice("64MiB", session_overhead="1MiB", run_overhead="2MiB")
    path, x, y = _mlp(tmp_path, 256, 1)
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        cache.register("a", path, weights_threshold=4096, caller_threads=1)
        with cache.use("a") as m:
            np.testing.assert_allclose(m.run(None, {"x": x})[0], y, rtol=RTOL, atol=ATOL)
        group = cache._entries["a"].handle.group
        assert group.retained and cache._growth.floor is not None
        memory = cache._entries["a"].backend.memory
        memory.begin_working(group.working_bytes, group.key)      # a run in flight, as OrtModel books it
        try:
            for _ in range(3):
                cache.check_pressure()
            assert cache.stats()["device.runtime_bytes"] == 0
        finally:
            memory.end_working(group.key)
