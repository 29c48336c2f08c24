"""Weights mode on the operator families of real architectures (the CPU builders): the check on the
device picks it, ONNX Runtime's optimizations are kept, Constant-node weights count, inputs are
checked, and a rewrite that really changes results is refused."""
import numpy as np
import pytest

import modelcache as mc

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from modelcache.tools.families import FAMILIES, make_family, sample_input  # noqa: E402

SMALL = 4096     # the "small" builders' weights are tens of KiB each: below the default 1 MiB threshold


@pytest.fixture
def cache():
    with mc.ModelCache(monitor=mc.SimulatedDevice("512MiB"), reserve=0, watch_interval=None) as c:
        yield c


def plain_outputs(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("constant_nodes", [False, True], ids=["initializers", "constant-nodes"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_in_weights_mode_with_optimized_graph(cache, family, constant_nodes):
    model = make_family(family, seed=3, constant_nodes=constant_nodes)
    feed = sample_input(model)
    expected = plain_outputs(model, feed)
    assert all(np.std(e) > 0 for e in expected)          # outputs that vary: the comparison means something
    cache.register("m", model, backend="onnxruntime", weights_threshold=SMALL)
    cache.prefetch("m", tier=mc.Tier.HOST).result()
    assert cache.info("m").details["mode"] == "weights" and not cache.info("m").details["prepared"]
    with cache.use("m") as served:
        got = served.run(None, feed)
    details = cache.info("m").details
    assert details["mode"] == "weights", details["mode_reason"]
    assert details["prepared"] and details["optimized_graph"] and details["verified_on"] == "cpu"
    assert 0 <= details["deviation"] <= details["tolerance"] and details["output_scale"] > 0
    assert "match" in details["mode_reason"]
    weights = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer if i.data_type == 1)
    consts = sum(int(np.prod(n.attribute[0].t.dims)) * 4 for n in model.graph.node if n.op_type == "Constant")
    assert details["weights_bytes"] >= 0.5 * (weights + consts)    # the weights are swapped, Constant nodes too
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


def test_ort_optimizations_are_kept_in_the_served_graph(cache):
    """BatchNormalization is folded into the convolutions and the attention block is fused, as in a
    plain session: the lifted graph the shared session runs is ONNX Runtime's optimized one."""
    for name, family in (("r", "resnet"), ("b", "bert")):
        cache.register(name, make_family(family), backend="onnxruntime", weights_threshold=SMALL)
        with cache.use(name):
            pass
    ops = {name: {n.op_type for n in onnx.load_from_string(cache._entries[name].handle.graph).graph.node}
           for name in ("r", "b")}
    assert "BatchNormalization" not in ops["r"]
    assert "Erf" not in ops["b"] and {"Gelu", "SkipLayerNormalization"} <= ops["b"]   # fused


def test_weights_are_bound_once_per_residency(cache, monkeypatch):
    model = make_family("bert")
    feed = sample_input(model)
    cache.register("m", model, backend="onnxruntime", weights_threshold=SMALL)
    with cache.use("m"):             # the first swap-in checks the model; from now on, count bindings
        pass
    cache.evict("m")
    from modelcache.backends.onnxruntime.model import OrtModel
    calls = []
    real = OrtModel._new_binding       # what io_binding() and runs use to make a binding
    monkeypatch.setattr(OrtModel, "_new_binding", lambda self: calls.append(1) or real(self))
    with cache.use("m") as served:   # a swap-in: the weights are bound here, once
        first = served.run(None, feed)[0]
        for _ in range(20):
            np.testing.assert_array_equal(served.run(None, feed)[0], first)
        other = sample_input(model, seed=5)
        assert not np.array_equal(served.run(None, other)[0], first)    # inputs are rebound every run
    assert len(calls) == 1        # one binding with the weights, reused by every run


def test_fine_tunes_of_one_architecture_share_one_session(cache):
    for seed in range(3):
        cache.register(f"v{seed}", make_family("resnet", seed=seed), backend="onnxruntime", weights_threshold=SMALL)
        with cache.use(f"v{seed}"):
            pass
    assert cache.info("v2").details["session_shared_by"] == 3
    assert cache.stats()["onnxruntime.sessions"] == 1


@pytest.mark.parametrize("mode", ["weights", "session"])
def test_inputs_are_checked_against_declared_shapes_and_types(cache, mode):
    model = make_family("resnet")                  # x: float32 [1, 3, 32, 32]
    feed = sample_input(model)
    cache.register("m", model, backend="onnxruntime", mode=mode, weights_threshold=SMALL)
    with cache.use("m") as served:
        with pytest.raises(mc.ModelInputError, match=r"'m'.*'x'.*shape \[3, 3, 32, 32\], expected \[1, 3, 32, 32\]"):
            served.run(None, {"x": np.zeros((3, 3, 32, 32), np.float32)})
        with pytest.raises(mc.ModelInputError, match=r"'x'.*dtype float64, expected float32"):
            served.run(None, {"x": feed["x"].astype(np.float64)})
        with pytest.raises(mc.ModelInputError, match=r"'x'.*shape \[3, 32, 32\]"):
            served.run(None, {"x": feed["x"][0]})
        served.run(None, feed)                     # and the right input still runs


def test_symbolic_dimensions_accept_any_size(cache):
    from modelcache.tools.generate import make_mlp
    cache.register("m", make_mlp(128, 2), backend="onnxruntime", weights_threshold=4096)   # x: [batch, 128]
    with cache.use("m") as served:
        assert served.run(None, {"x": np.ones((5, 128), np.float32)})[0].shape == (5, 128)
        with pytest.raises(mc.ModelInputError, match=r"shape \[5, 64\], expected \[\?, 128\]"):
            served.run(None, {"x": np.ones((5, 64), np.float32)})


def test_a_rewrite_that_changes_results_is_refused(cache, monkeypatch):
    """The check compares on the device with a tolerance scaled to the outputs: a rewrite that
    scales one weight by 1.01 changes a ResNet's logits by far more than that tolerance."""
    import modelcache.backends.onnxruntime.optimize as optimize
    real = optimize.candidate_outputs

    def drifting(backend, handle, lifted, session, ptr, runner, feed):
        outputs = real(backend, handle, lifted, session, ptr, runner, feed)
        return [o * 1.01 for o in outputs]
    monkeypatch.setattr(optimize, "candidate_outputs", drifting)
    model = make_family("resnet")
    cache.register("m", model, backend="onnxruntime", weights_threshold=SMALL)
    with cache.use("m") as served:
        got = served.run(None, sample_input(model))[0]
    details = cache.info("m").details
    assert details["mode"] == "session" and "differs" in details["mode_reason"]
    assert details["deviation"] > details["tolerance"]
    np.testing.assert_allclose(got, plain_outputs(model, sample_input(model))[0], rtol=1e-4, atol=1e-3)


def _served_graph(cache, name):
    return onnx.load_from_string(cache._entries[name].handle.graph).graph


def test_matmul_weights_are_stored_transposed_on_the_cpu(cache):
    """The CPU provider packs weights that are graph inputs again on every run, at less cost from
    the transposed layout: every dense weight of the BERT-like builder is stored so and its Gemm
    reads it with transB=1, and the outputs are still the plain session's."""
    model = make_family("bert", seed=1)
    feed = sample_input(model)
    dense = [i for i in model.graph.initializer if i.name.startswith("dense_w")]
    cache.register("b", model, backend="onnxruntime", weights_threshold=SMALL)
    with cache.use("b") as served:
        got = served.run(None, feed)[0]
    details = cache.info("b").details
    assert details["mode"] == "weights" and details["transposed_weights"] == len(dense) > 0
    served_graph = _served_graph(cache, "b")
    gemms = [n for n in served_graph.node if n.op_type == "Gemm"]
    assert len(gemms) == len(dense)
    trans_b = [next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "transB"), 0) for n in gemms]
    assert trans_b == [1] * len(gemms)      # an absent transB is 0: it counts as not transposed
    served_shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in served_graph.input}
    declared = {i.name: list(i.dims) for i in dense}
    assert {n.input[1] for n in gemms} == set(declared)
    assert all(served_shapes[name] == dims[::-1] for name, dims in declared.items())   # [out, in]: transposed
    expected = plain_outputs(model, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def _matmuls_model():
    """MatMul with a weight on a 1-D, a 2-D and a 3-D left side, a Gemm whose weight is already
    transposed, and a weight tied to an embedding (Gather) as well as a MatMul."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(7)
    w = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
         (("w1", (16, 24)), ("w2", (16, 24)), ("w3", (16, 24)), ("wt", (24, 16)), ("tied", (16, 16)))}
    nodes = [helper.make_node("MatMul", ["v", "w1"], ["y1"]),
             helper.make_node("MatMul", ["x", "w2"], ["y2"]),
             helper.make_node("MatMul", ["s", "w3"], ["y3"]),
             helper.make_node("Gemm", ["x", "wt"], ["y4"], transB=1),
             helper.make_node("Gather", ["tied", "ids"], ["emb"]),
             helper.make_node("MatMul", ["emb", "tied"], ["y5"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "matmuls",
        [helper.make_tensor_value_info("v", f, [16]), helper.make_tensor_value_info("x", f, [3, 16]),
         helper.make_tensor_value_info("s", f, [2, 3, 16]), helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info(n, f, None) for n in ("y1", "y2", "y3", "y4", "y5")],
        [numpy_helper.from_array(a, n) for n, a in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(8)
    feed = {"v": rng.standard_normal(16).astype(np.float32), "x": rng.standard_normal((3, 16)).astype(np.float32),
            "s": rng.standard_normal((2, 3, 16)).astype(np.float32), "ids": np.array([0, 5, 15, 2], np.int64)}
    return model, feed


@pytest.mark.parametrize("tier", [mc.Tier.HOST, mc.Tier.DISK])
def test_transposed_weights_give_the_plain_sessions_outputs_on_every_left_side(tmp_path, tier):
    model, feed = _matmuls_model()
    expected = plain_outputs(model, feed)
    with mc.ModelCache(monitor=mc.SimulatedDevice("512MiB"), reserve=0, watch_interval=None,
                       disk_dir=str(tmp_path)) as cache:
        cache.register("m", model, backend="onnxruntime", weights_threshold=1024, mode="weights")
        with cache.use("m") as served:
            first = served.run(None, feed)
        assert cache.info("m").details["transposed_weights"] == 3     # w1, w2, w3: not wt (transB=1), not tied
        cache.evict("m", tier=tier)                                    # back from the host or the disk
        with cache.use("m") as served:
            again = served.run(None, feed)
        nodes = {n.output[0]: n for n in _served_graph(cache, "m").node}
    assert {nodes[y].op_type for y in ("y1", "y2", "y3")} == {"FusedMatMul"}
    assert nodes["y4"].op_type == "Gemm" and nodes["y5"].op_type == "MatMul"
    for e, a, b in zip(expected, first, again):
        assert np.std(e) > 0
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a, b)


def test_no_weight_is_transposed_for_a_provider_that_does_not_want_it(cache, monkeypatch):
    from modelcache.backends.onnxruntime.sessions import CpuProvider, CudaProvider
    assert CpuProvider.transposed_matmul_weights and not CudaProvider.transposed_matmul_weights
    monkeypatch.setattr(CpuProvider, "transposed_matmul_weights", False)
    model, feed = _matmuls_model()
    cache.register("m", model, backend="onnxruntime", weights_threshold=1024, mode="weights")
    with cache.use("m") as served:
        got = served.run(None, feed)
    assert "transposed_weights" not in cache.info("m").details
    assert "FusedMatMul" not in {n.op_type for n in _served_graph(cache, "m").node}
    for e, g in zip(plain_outputs(model, feed), got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_a_failed_rewrite_keeps_the_original_graph_and_gives_the_block_back(cache, monkeypatch):
    """Step 2 failing on the optimized graph: the model is lifted from its original graph (and
    checked the same way), and the host block the optimized graph's weights were read into goes
    back to the pool."""
    import modelcache.backends.onnxruntime.graph as graph_module

    def broken(proto, weights, block):
        raise ValueError("a rewrite that fails")
    monkeypatch.setattr(graph_module, "transpose_matmul_weights", broken)
    model = make_family("bert", seed=2)
    feed = sample_input(model)
    cache.register("m", model, backend="onnxruntime", weights_threshold=SMALL)
    cache.prefetch("m", tier=mc.Tier.HOST).result()      # loaded, not yet prepared
    pool = cache._entries["m"].backend.pool
    idle = pool.idle_bytes
    with cache.use("m") as served:
        got = served.run(None, feed)[0]
    details = cache.info("m").details
    assert details["mode"] == "weights" and not details["optimized_graph"]
    assert "a rewrite that fails" in details["optimized_graph_unused"] and "transposed_weights" not in details
    assert pool.idle_bytes >= idle + details["weights_bytes"] // 2     # the optimized graph's block is back
    expected = plain_outputs(model, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
