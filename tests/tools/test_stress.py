import json
import os

import pytest

import modelcache as mc
from modelcache.tools import stress
from modelcache.tools.stress import run as stress_run
from modelcache.tools.cli import main as cli_main

pytest.importorskip("onnxruntime")

SMALL = ["--models", "4", "--min-size", "64KiB", "--max-size", "256KiB", "--layers", "2", "--requests", "240",
         "--threads", "3", "--budget", "512KiB", "--policies", "lru,cost", "--baseline-requests", "60",
         "--simulate", "--no-progress"]


def test_stress_runs_checks_every_response_and_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    args = SMALL + ["--models-dir", str(tmp_path / "models"), "--json", str(out_json), "--plot", str(out_png)]
    assert cli_main(["stress"] + args) == 0
    text = capsys.readouterr().out
    assert "simulated device" in text and "belady (offline)" in text and "hit@base" in text
    report = json.loads(out_json.read_text())
    assert set(report["contenders"]) == {"modelcache-lru", "modelcache-cost", "lru-count", "naive"}
    for name, c in report["contenders"].items():
        assert c["requests"] == (240 if name.startswith("modelcache") else 60)
        assert c["wrong"] == c["oom"] == c["errors"] == 0
        assert 0 <= c["hit_rate"] <= 1 and c["p50_ms"] <= c["p99_ms"] and c["timeline"]
    assert report["contenders"]["modelcache-lru"]["peak_device_bytes"] <= report["budget_bytes"]
    for name, c in report["contenders"].items():      # the books beside the readings: modelcache's only
        if name.startswith("modelcache"):
            assert 0 < c["accounted_at_peak_bytes"] <= c["peak_accounted_bytes"]
            assert "its books held" in text
        else:
            assert c["accounted_at_peak_bytes"] is None and c["peak_accounted_bytes"] is None
    assert report["contenders"]["naive"]["swap_ins"] >= 1 and 0 <= report["belady"]["hit_rate"] <= 1
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_outputs_give_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stress_run, "output_ok", lambda out, ref: False)
    args = SMALL + ["--models-dir", str(tmp_path / "models"), "--baselines", "naive"]
    assert cli_main(["stress"] + args) == 1
    assert "wrong" in capsys.readouterr().out


def test_out_of_memory_gives_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    def no_memory(self, spec):
        raise mc.DeviceOutOfMemoryError("out of memory on the simulated GPU", model=spec.name)

    monkeypatch.setattr(stress.contenders._SessionContender, "_create", no_memory)
    args = SMALL + ["--models-dir", str(tmp_path / "models"), "--baselines", "lru-count", "--policies", "lru"]
    assert cli_main(["stress"] + args) == 1
    out = capsys.readouterr().out
    assert "first failure: DeviceOutOfMemoryError" in out


def test_generated_models_are_reused_and_references_match(tmp_path):
    specs = stress.generate_models(str(tmp_path), 3, 64 << 10, 1 << 20, layers=2, seed=5)
    again = stress.generate_models(str(tmp_path), 3, 64 << 10, 1 << 20, layers=2, seed=5)
    assert [s.path for s in specs] == [s.path for s in again]
    assert 64 << 10 <= min(s.nbytes for s in specs) * 1.5 and max(s.nbytes for s in specs) <= (1 << 20) * 1.5
    import onnxruntime as ort
    for spec in specs:
        out = ort.InferenceSession(spec.path, providers=["CPUExecutionProvider"]).run(None, spec.feed)[0]
        assert stress.output_ok(out, spec.reference)
        assert not stress.output_ok(out * 1.5, spec.reference)


def test_demo_finishes_with_table_json_and_plot(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path), "--requests", "400", "--simulate"]) == 0
    text = capsys.readouterr().out
    assert "simulated device" in text and "(requested)" in text and "modelcache-lru" in text
    assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "plot.png")
    assert f"plot: {tmp_path / 'plot.png'}" in text


def test_status_and_bench(tmp_path, capsys):
    from modelcache.tools.generate import make_mlp, save_model
    from modelcache.tools.status import cache_table, gpu_table, report
    rows = gpu_table()
    assert rows and ("no GPU table" in rows[0] or "gpu" in rows[0])
    path = save_model(make_mlp(512, 2), str(tmp_path / "m.onnx"))   # 1 MiB weights: weights mode
    with mc.ModelCache(monitor=mc.SimulatedDevice("64MiB"), reserve=0, watch_interval=None) as cache:
        cache.register("m", path, weights_threshold=1024)
        with cache.use("m"):
            pass
        table = cache_table(cache.status())
        assert "m " in table[-1] and "device" in table[-1] and "weights" in table[-1]
        assert "policy lru" in report([cache])
        cache.dump_status(str(tmp_path / "status.json"))
    assert cli_main(["status", "--cache", str(tmp_path / "status.json")]) == 0
    assert "hit rate" in capsys.readouterr().out
    assert cli_main(["bench", path, "--cycles", "2", "--simulate"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "session" in out and "swap-in ms" in out
    assert "failed" not in out        # a failed variant still prints its mode: it must not pass for a result
    assert cli_main(["bench", str(tmp_path / "missing.onnx"), "--simulate"]) == 2     # a usage error


@pytest.mark.parametrize("kind", ["lru-count", "naive"])
def test_baselines_count_waiting_for_a_load_as_a_miss(monkeypatch, kind):
    """Two requests arrive while the model is not loaded: both are misses, though the second only
    waits for the first one's load; a later request is a hit. modelcache counts the same way."""
    import threading
    import time
    import numpy as np

    device = mc.SimulatedDevice("1GiB")
    contender = stress.LruCountContender(2, device) if kind == "lru-count" else stress.NaiveContender(device)

    class FakeSession:
        def run(self, names, feed):
            return [feed["x"]]

    def create(spec):
        time.sleep(0.3)
        return FakeSession(), None

    monkeypatch.setattr(contender, "_create", create)
    x = np.ones((1, 4), np.float32)
    spec = stress.ModelSpec("a", "unused.onnx", 16, {"x": x}, x)
    hits = []
    threads = [threading.Thread(target=lambda: hits.append(contender.serve(spec)[1])) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert hits == [False, False]
    assert contender.serve(spec)[1] is True


def test_baselines_free_their_device_memory_when_closed(tmp_path):
    """The next contender's memory baseline must not include this one's sessions."""
    import numpy as np
    specs = stress.generate_models(str(tmp_path / "m"), 3, 64 * 1024, 128 * 1024, layers=2)
    for make in (lambda d: stress.LruCountContender(2, d), stress.NaiveContender):
        device = mc.SimulatedDevice("64MiB")
        contender = make(device)
        for spec in specs:
            out, _, _ = contender.serve(spec)
            assert stress.output_ok(out, spec.reference) and not stress.output_ok(out, np.zeros_like(out) + 1)
        assert device.process_bytes() > 0
        contender.close()
        assert device.process_bytes() == 0


def test_baselines_pay_for_their_runs_working_memory_on_a_simulated_device(tmp_path):
    """A stock session keeps its runs' working memory in its own arena while it exists: a
    simulated device charges a baseline's session for it, as modelcache's runs are."""
    specs = stress.generate_models(str(tmp_path / "m"), 2, 64 * 1024, 128 * 1024, layers=2)
    for make in (lambda d: stress.LruCountContender(2, d), stress.NaiveContender):
        device = mc.SimulatedDevice("64MiB", session_overhead="8KiB", run_overhead="32KiB")
        contender = make(device)
        contender.serve(specs[0])
        assert device.process_bytes() == specs[0].nbytes + 8 * 1024 + 32 * 1024
        contender.close()
        assert device.process_bytes() == 0


def test_stress_on_architectures_keeps_the_device_and_the_books_within_the_budget(tmp_path):
    """Six architectures whose sessions take a third of the budget (the simulated device charges
    them), 8 threads: neither the device nor the cache's books ever exceed the budget (before the
    ledger answered for what evicted models keep, and before a swap-in waited for a session being
    dropped, the books went 8-10 % over)."""
    out_json = tmp_path / "r.json"
    args = ["stress", "--families", "12", "--simulate", "--budget-of-weights", "0.45", "--threads", "8",
            "--requests", "600", "--baselines", "", "--policies", "lru", "--sim-session-overhead", "256KiB",
            "--sim-link", "1", "--no-progress", "--models-dir", str(tmp_path / "models"), "--json", str(out_json)]
    assert cli_main(args) == 0
    report = json.loads(out_json.read_text())
    c = report["contenders"]["modelcache-lru"]
    assert c["wrong"] == c["oom"] == c["errors"] == 0 and c["requests"] == 600
    assert report["architectures"] == 6
    assert c["peak_device_bytes"] <= report["budget_bytes"]
    assert c["peak_accounted_bytes"] <= report["budget_bytes"]


def test_stress_with_runs_working_memory_in_an_arena_stays_within_the_budget(tmp_path):
    """As above with runs' working memory charged (64 KiB a run) and kept in an arena that gives
    back only 20 % of it when shrunk, as ONNX Runtime's CUDA arena did on the H200: the device
    stays within the budget; the baseline pays for its runs too (its sessions keep them)."""
    out_json = tmp_path / "r.json"
    args = ["stress", "--families", "12", "--simulate", "--budget-of-weights", "0.45", "--threads", "8",
            "--requests", "400", "--baselines", "lru-count", "--baseline-requests", "60", "--policies", "lru",
            "--sim-session-overhead", "256KiB", "--sim-run-overhead", "64KiB", "--sim-arena-keeps", "0.8",
            "--sim-link", "1", "--no-progress", "--models-dir", str(tmp_path / "models"), "--json", str(out_json)]
    assert cli_main(args) == 0
    report = json.loads(out_json.read_text())
    assert report["config"]["arena_keeps"] == 0.8 and report["config"]["run_overhead"] == "64KiB"
    c = report["contenders"]["modelcache-lru"]
    assert c["wrong"] == c["oom"] == c["errors"] == 0 and c["requests"] == 400
    assert c["peak_device_bytes"] <= report["budget_bytes"]
    assert c["peak_accounted_bytes"] <= report["budget_bytes"]
    assert report["contenders"]["lru-count"]["requests"] == 60


def test_provider_options_reach_every_contender_and_the_report(tmp_path, monkeypatch, capsys):
    seen = {}
    real_register = mc.ModelCache.register

    def register(self, name, source, **options):
        seen[name] = options.get("provider_options")
        return real_register(self, name, source, **options)
    monkeypatch.setattr(mc.ModelCache, "register", register)
    out_json = tmp_path / "r.json"
    args = SMALL + ["--models-dir", str(tmp_path / "models"), "--json", str(out_json), "--policies", "lru",
                    "--provider-option", "use_ep_level_unified_stream=0", "--provider-option", "a=b=c"]
    assert cli_main(["stress"] + args) == 0
    expected = {"use_ep_level_unified_stream": "0", "a": "b=c"}
    assert seen and all(v == expected for v in seen.values())
    assert json.loads(out_json.read_text())["config"]["provider_options"] == expected
    assert "unused: the CPU provider runs on a simulated device" in capsys.readouterr().out
    lru = stress.LruCountContender(2, mc.SimulatedDevice("1GiB"), expected)
    assert lru.providers == ["CPUExecutionProvider"]         # a simulated device: the CPU provider

    class OnAGpu(mc.SimulatedDevice):
        simulated = False
    lru = stress.LruCountContender(2, OnAGpu("1GiB"), expected)
    assert lru.providers == [("CUDAExecutionProvider", expected), "CPUExecutionProvider"]
    for bad, why in ((["novalue"], "'novalue': expected KEY=VALUE"), (["a=1", " a =2"], "a given twice"),
                     (["device_id=1"], "device_id: set by modelcache itself")):
        args = [x for item in bad for x in ("--provider-option", item)]
        assert cli_main(["stress"] + args + SMALL) == 2
        assert why in capsys.readouterr().err
