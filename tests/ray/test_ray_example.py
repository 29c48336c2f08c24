"""examples/ray_serve.py: end to end, small (a local Ray on the CPU, both contenders over the same
trace, every output checked, exit 0 and both sets of figures in the JSON; which one wins is not
asserted here: a shared CI machine's timings are too noisy for that, docs/ray.md has the full
run's figures), and, without Ray, what its GPU run relies on: inputs made from each model's
declared inputs, references from a CPU session, outputs checked (sampled when large)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLE = os.path.join(ROOT, "examples", "ray_serve.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("ray_serve_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)          # imports modelcache.ray, not Ray
    return module


def test_smoke_runs_both_contenders_and_checks_every_output(tmp_path):
    pytest.importorskip("ray.serve")
    out_json = tmp_path / "figures.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, EXAMPLE, "--smoke", "--models", "8", "--requests", "300", "--threads", "4",
                           "--json", str(out_json)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "requests/s" in proc.stdout and "p99 latency" in proc.stdout
    report = json.loads(out_json.read_text())
    assert set(report["contenders"]) == {"modelcache", "ray-multiplexed"}
    for name, figures in report["contenders"].items():
        assert figures["requests"] == figures["served"] == 300, (name, figures)
        assert figures["errors"] == 0 and figures["wrong"] == 0, (name, figures)
        assert 0.0 <= figures["hit_rate"] <= 1.0 and figures["p99_ms"] >= figures["p50_ms"] > 0
        assert sum(figures["per_replica"].values()) == 300
        assert figures["common"]["requests"] == 300 and figures["common"]["hit_rate"] == figures["hit_rate"]


def test_models_of_a_folder_get_inputs_of_their_declared_types(example, tmp_path):
    """A folder as the GPU run uses: int64 token ids (below the model's vocabulary), an int32 mask,
    a float image; fine-tunes named NAME-ftK; weights in external data files, counted."""
    import onnx
    from onnx import TensorProto, helper
    from modelcache.tools.families import make_bert, make_resnet
    from modelcache.tools.generate import save_model

    save_model(make_bert(vocab=300, seed=0), str(tmp_path / "bert.onnx"), external_data=True)
    save_model(make_bert(vocab=300, seed=1), str(tmp_path / "bert-ft1.onnx"))
    save_model(make_resnet(seed=0), str(tmp_path / "resnet.onnx"), external_data=True)
    masked = helper.make_graph(      # y = x * mask + position ids: the inputs' values show in the output
        [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["position_ids"], ["p"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "m"], ["xm"]), helper.make_node("Add", ["xm", "p"], ["y"])], "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "seq"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])])
    onnx.save_model(helper.make_model(masked, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "masked.onnx"))

    specs = {s.name: s for s in example.folder_specs(str(tmp_path))}
    assert sorted(specs) == ["bert", "bert-ft1", "masked", "resnet"]
    ids = specs["bert"].feed["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (1, 16) and 0 <= ids.min() and ids.max() < 300
    assert specs["bert"].reference.shape == (1, 16, 64)
    assert specs["resnet"].feed["x"].dtype == np.float32 and specs["resnet"].feed["x"].shape == (1, 3, 32, 32)
    feed = specs["masked"].feed
    assert feed["attention_mask"].dtype == np.int32 and (feed["attention_mask"] == 1).all()
    assert feed["position_ids"].tolist() == [list(range(16))]
    np.testing.assert_allclose(specs["masked"].reference, feed["x"] + np.arange(16), rtol=1e-6)
    weights = os.path.getsize(tmp_path / "bert.onnx.data")
    assert specs["bert"].nbytes == os.path.getsize(tmp_path / "bert.onnx") + weights
    assert specs["bert-ft1"].nbytes == os.path.getsize(tmp_path / "bert-ft1.onnx") > weights


def test_outputs_are_checked_and_large_ones_sampled(example):
    from modelcache.tools.stress.models import ModelSpec
    small = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(1, 1000)
    large = np.random.default_rng(0).standard_normal((1, 128, 1024)).astype(np.float32)   # 131072 values
    for reference in (small, large):
        spec = ModelSpec("m", "m.onnx", 0, {}, reference)
        out = example.answer(reference + 1e-4, True, "r")      # within TF32's deviation
        assert out["y"].size == min(reference.size, example.SAMPLE_VALUES)
        assert example.correct(out, spec)
        assert not example.correct(example.answer(reference[..., ::-1], True, "r"), spec)   # another output
        assert not example.correct(example.answer(reference.reshape(-1), True, "r"), spec)  # another shape


def test_gpu_run_options(example, monkeypatch):
    """The GPU command of docs/ray.md, without a GPU: both deployments share GPU 0 (a quarter each:
    two replicas of each contender, side by side), Ray is started for that GPU alone, without
    dashboard, usage report or HTTP proxy, and every process it starts keeps NVLink multicast off."""
    serve = pytest.importorskip("ray.serve")
    import ray
    from modelcache.tools.stress.models import ModelSpec
    args = example.parse_args("--device 0 --replicas 2 --budget 4GiB --models-dir zoo --requests 2000 --threads 16 "
                              "--zipf-s 1.1 --json out.json".split())
    assert args.progress and args.chunk == 250 and args.time_limit > 0 and args.request_timeout > 0
    specs = [ModelSpec(name, f"zoo/{name}.onnx", 400 << 20, {}, np.zeros(1)) for name in ("bert-base", "gpt2")]
    for name in args.contenders:
        deployment = example.build_app(name, args, specs, 4 << 30, 3)._bound_deployment
        assert deployment.ray_actor_options == {"num_cpus": 0, "num_gpus": 0.25}
    mc_options = example.build_app("modelcache", args, specs, 4 << 30, 3)._bound_deployment.init_args
    assert mc_options[1]["device_budget"] == 4 << 30 and mc_options[3] is None      # a real device, not simulated
    started = {}
    for key in (*example.GPU_ENV, "CUDA_VISIBLE_DEVICES", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(key, "")         # restored (or removed) after the test: start_ray sets them
        monkeypatch.delenv(key)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(serve, "start", lambda **kwargs: started.update(serve_start=kwargs))
    example.start_ray(args, gpu=True)
    assert started["num_gpus"] == 1 and started["include_dashboard"] is False
    assert started["runtime_env"] == {"env_vars": example.GPU_ENV}
    assert started["serve_start"] == {"proxy_location": "Disabled"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert example.GPU_ENV == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                               "NVSHMEM_DISABLE_NVLS": "1"}
    assert all(os.environ[key] == value for key, value in example.GPU_ENV.items())
