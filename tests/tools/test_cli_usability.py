"""The command line's usability (issue 13, item 8): --version, defaults in --help, one-line errors
with exit status 2, bench's exit status, simulated stress sized for the machine, progress bars."""
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

import modelcache as mc
from modelcache.tools import cli
from modelcache.tools.cli import main as cli_main
from modelcache.tools.stress import sizing
from modelcache.tools.stress.run import Progress, StressConfig

MiB = 1 << 20
GiB = 1 << 30
TINY = ["--layers", "2", "--requests", "40", "--threads", "2", "--policies", "lru", "--baselines", "naive",
        "--simulate", "--no-progress"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "modelcache", *args], capture_output=True, text=True, timeout=60,
                          env=env)


# ----------------------------------------------------------------------------- --version, --help
def test_version_prints_name_and_version():
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"modelcache {mc.__version__}"


@pytest.mark.parametrize("command", ["demo", "stress", "bench", "status", "convert"])
def test_every_default_is_in_the_help_once(command, capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)).choices[command]
    with pytest.raises(SystemExit) as exit_:
        cli_main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())       # unwrapped
    shown = 0
    for action in sub._actions:
        default = action.default
        if not action.option_strings or default in (None, False, "", ()) or default is cli.argparse.SUPPRESS:
            continue
        assert f"(default: {default})" in text.replace("- ", "-"), (command, action.dest)
        shown += 1
    assert text.count("(default") == text.count("(default:"), "a hand-written default is left"
    assert shown or command == "status"
    for hand_written in ("(default 6000", "(default 40)", "(default ~/.cache", "(default 4 x"):
        assert hand_written not in text


def test_stress_help_states_the_machine_sized_defaults(capsys):
    with pytest.raises(SystemExit):
        cli_main(["stress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 40; simulated" in text and "(default: 1GiB; simulated" in text
    assert "min(2 GiB, 10% of the free disk" in text


# ----------------------------------------------------------------------------- errors: one line, exit 2
def _one_error_line(result):
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_status_of_a_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    line = _one_error_line(run_cli("status", "--cache", str(path)))
    assert line.startswith("modelcache status: ") and str(path) in line and "No such file" in line


def test_status_of_an_unreadable_file(tmp_path):
    line = _one_error_line(run_cli("status", "--cache", str(tmp_path)))     # a folder: not readable as a file
    assert str(tmp_path) in line and "directory" in line.lower()
    if os.geteuid() != 0:                                                   # root reads anything
        path = tmp_path / "locked.json"
        path.write_text("{}")
        path.chmod(0)
        line = _one_error_line(run_cli("status", "--cache", str(path)))
        assert str(path) in line and "Permission denied" in line


@pytest.mark.parametrize("content,cause", [("{\"stats\": ", "not valid JSON"), (b"\xff\xfe{", "not valid JSON"),
                                           ("[1, 2]", "JSON list"), ('{"stats": {}}', "missing field"),
                                           ('{"device": 0, "policy": "lru", "stats": 7, "entries": []}',
                                            "wrong type")])
def test_status_of_malformed_json(tmp_path, capsys, content, cause):
    path = tmp_path / "status.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cli_main(["status", "--cache", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("modelcache status: ") and str(path) in err[0] and cause in err[0]


def test_status_of_a_real_status_file_still_works(tmp_path, capsys):
    import numpy as np
    with mc.ModelCache(monitor=mc.SimulatedDevice("64MiB"), reserve=0, watch_interval=None) as cache:
        cache.register("a", lambda: np.zeros(10))
        cache.dump_status(str(tmp_path / "s.json"))
    assert cli_main(["status", "--cache", str(tmp_path / "s.json")]) == 0
    assert "hit rate" in capsys.readouterr().out


def test_library_and_os_errors_of_any_command_are_one_line(monkeypatch, capsys):
    def config_error(args):
        raise mc.ConfigError("budget='x' is not a size")

    def os_error(args):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(cli, "_stress", config_error)
    assert cli_main(["stress"]) == 2
    assert capsys.readouterr().err == "modelcache stress: budget='x' is not a size\n"
    monkeypatch.setattr(cli, "_demo", os_error)
    assert cli_main(["demo"]) == 2
    assert capsys.readouterr().err == "modelcache demo: /some/file: Permission denied\n"


def test_traceback_on_request(tmp_path, monkeypatch):
    path = tmp_path / "bad.json"
    path.write_text("{")
    for args, env in (([], {"MODELCACHE_TRACEBACK": "1"}), (["--traceback"], {})):
        out = run_cli(*args, "status", "--cache", str(path), env={**os.environ, **env})
        assert out.returncode == 1 and "Traceback" in out.stderr and "CorruptFileError" in out.stderr
    out = run_cli("status", "--cache", str(path), "--traceback")
    assert "Traceback" in out.stderr


def test_bad_stress_option_is_one_line(tmp_path):
    line = _one_error_line(run_cli("stress", "--budget", "lots", "--models-dir", str(tmp_path), *TINY,
                                   "--models", "2", "--min-size", "64KiB", "--max-size", "64KiB"))
    assert line.startswith("modelcache stress: ") and "'lots'" in line


# ----------------------------------------------------------------------------- bench's exit status
def test_bench_exits_1_when_a_model_fails(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from modelcache.tools.generate import make_mlp, save_model
    good = save_model(make_mlp(64, 2), str(tmp_path / "good.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an ONNX model")
    assert cli_main(["bench", good, "--cycles", "1", "--simulate"]) == 0
    assert "failed" not in capsys.readouterr().out
    assert cli_main(["bench", good, str(bad), "--cycles", "1", "--simulate"]) == 1
    captured = capsys.readouterr()
    rows = captured.out.splitlines()
    assert sum("good.onnx" in r and "failed" not in r for r in rows) == 2      # the good one is still measured
    assert sum("bad.onnx" in r and "failed:" in r for r in rows) == 2
    assert "2 of 4 runs failed" in captured.err


def test_bench_of_a_missing_file_is_a_usage_error(tmp_path, capsys):
    assert cli_main(["bench", str(tmp_path / "missing.onnx"), "--simulate"]) == 2
    assert f"no file at {tmp_path / 'missing.onnx'}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- stress sized for the machine
def test_simulated_sizes_fit_two_gib_with_forty_models():
    models, lo, hi, budget = sizing.simulated_sizes(None, None, None, None, layers=4, cap=2 * GiB)
    assert models == 40 and hi <= 2 * GiB // 40 and hi >= 40 * MiB and lo * 16 <= hi < lo * 17
    assert budget == 8 * hi
    assert models * sizing.model_file_bytes(hi, 4) <= 2 * GiB


@pytest.mark.parametrize("cap", [5 * MiB, 40 * MiB, 300 * MiB, 1 * GiB, 2 * GiB])
@pytest.mark.parametrize("layers", [2, 4, 7])
def test_simulated_sizes_keep_the_files_within_the_cap(cap, layers):
    models, lo, hi, budget = sizing.simulated_sizes(None, None, None, None, layers, cap)
    assert 2 <= models <= 40 and 0 < lo <= hi <= budget
    assert models * sizing.model_file_bytes(hi, layers) <= cap
    assert models == 40 or cap < 40 * sizing.model_file_bytes(MiB, layers)


def test_the_cap_is_the_smallest_of_2gib_a_tenth_of_the_disk_and_of_the_ram(tmp_path):
    assert sizing.machine_cap(str(tmp_path / "a" / "b"), disk_free=100 * GiB, ram_total=64 * GiB)[0] == 2 * GiB
    cap, why = sizing.machine_cap(str(tmp_path / "a" / "b"), disk_free=5 * GiB, ram_total=64 * GiB)
    assert cap == GiB // 2 and str(tmp_path) in why and "5.0 GiB free" in why
    assert sizing.machine_cap(str(tmp_path), disk_free=100 * GiB, ram_total=4 * GiB)[0] == int(0.4 * GiB)


def test_explicit_sizes_win_and_a_gpu_keeps_the_documented_defaults(tmp_path):
    unset = StressConfig(models=None, min_size=None, max_size=None, budget=None, simulate=True)
    gpu, note = sizing.resolve_sizes(unset, gpu=True, folder=str(tmp_path))
    assert (gpu.models, gpu.min_size, gpu.max_size, gpu.budget) == (40, "64MiB", "1GiB", "8GiB") and note is None
    sim, note = sizing.resolve_sizes(unset, gpu=False, folder=str(tmp_path), disk_free=100 * GiB,
                                     ram_total=64 * GiB)
    assert sim.models == 40 and mc.parse_size(sim.max_size) <= 2 * GiB // 40 and "simulated" in note
    given = StressConfig(models=10, min_size=None, max_size="100MiB", budget=None)
    sim, note = sizing.resolve_sizes(given, gpu=False, folder=str(tmp_path), disk_free=100 * GiB,
                                     ram_total=64 * GiB)
    assert (sim.models, sim.max_size, sim.budget) == (10, "100MiB", 800 * MiB)
    assert 100 * MiB // 17 <= sim.min_size <= 100 * MiB // 16
    assert "--min-size/--budget" in note
    same = StressConfig(models=3, min_size="1MiB", max_size="1GiB", budget="9GiB")
    assert sizing.resolve_sizes(same, gpu=False, folder=str(tmp_path)) == (same, None)


def test_stress_simulate_sizes_its_models_for_the_machine(tmp_path, monkeypatch, capsys):
    """40 MiB free: a 4 MiB cap; the files written stay within it and the log says why."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(sizing.shutil, "disk_usage", lambda path: type("U", (), {"free": 40 * MiB})())
    folder = tmp_path / "models"
    out_json = tmp_path / "r.json"
    assert cli_main(["stress", "--models", "4", "--models-dir", str(folder), "--json", str(out_json)] + TINY) == 0
    text = capsys.readouterr().out
    assert "sized for this machine (simulated): 4 models of" in text and "4.0 MiB" in text
    assert "--min-size/--max-size/--budget" in text and "10% of 40.0 MiB free" in text
    written = sum(f.stat().st_size for f in folder.iterdir())
    assert 0 < written <= 4 * MiB
    report = json.loads(out_json.read_text())
    assert max(m["bytes"] for m in report["models"]) <= 1 * MiB
    assert report["budget_bytes"] == 8 * mc.parse_size(report["config"]["max_size"])


# ----------------------------------------------------------------------------- progress
def test_progress_shows_count_rate_and_eta():
    out = io.StringIO()
    progress = Progress(True, force=True, file=out)
    progress("modelcache-lru", 0, 10)
    time.sleep(0.25)                                # bars redraw at most every 0.2 s
    progress("modelcache-lru", 3, 10)
    progress("modelcache-lru", 10, 10)
    text = out.getvalue()
    assert "modelcache-lru" in text and "10/10" in text
    # count/total [elapsed<ETA, rate]
    assert re.search(r"3/10 \[00:00<00:0\d, +\d+(\.\d+)?req/s\]", text), text
    quiet = io.StringIO()
    Progress(False, force=True, file=quiet)("x", 1, 2)
    Progress(True, file=quiet)("x", 1, 2)           # not a terminal, not forced
    assert quiet.getvalue() == ""


def test_stress_progress_goes_to_stderr_and_no_progress_silences_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    args = ["stress", "--models", "3", "--min-size", "64KiB", "--max-size", "64KiB", "--budget", "1MiB",
            "--models-dir", str(tmp_path)] + [a for a in TINY if a != "--no-progress"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert "generating models" in captured.err and "3/3" in captured.err and "model/s" in captured.err
    assert "modelcache-lru" in captured.err and "40/40" in captured.err and "req/s" in captured.err
    assert "40/40" not in captured.out
    assert cli_main(args + ["--no-progress"]) == 0
    assert "40/40" not in capsys.readouterr().err


def test_import_modelcache_does_not_import_tqdm():
    code = "import sys, modelcache; assert 'tqdm' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
