"""What concurrent runs cost on the device beyond the cache's books, with ONNX Runtime's CUDA
provider making a stream (and cuBLAS / cuDNN handles with their workspaces) for each run in
flight of each session (ONNX Runtime's default) against one stream per session
(``use_ep_level_unified_stream=1``, modelcache's default). One process per variant (NVML counts per process): the six
zoo architectures, one model each, on a budget they all fit in; the device bytes beyond the
books after sequential runs, after 8 threads over all six, after 8 threads on one model; request
throughput of those phases, and the median sequential run per model. Every output is compared
bitwise with that model's first output. Needs a GPU and the zoo
(``python benchmarks/zoo.py --export-only``); ``--sim`` is a dry run of the script on the CPU
builders (the CPU provider takes no stream option: both variants run alike there).

    python benchmarks/stream_memory.py [--json OUT.json]
"""
import argparse, json, os, statistics, subprocess, sys, threading, time
sys.path.insert(0, os.path.dirname(__file__)); sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
MiB = 1 << 20
ZOO_DIR = "/tmp/modelcache-zoo"
NAMES = ["resnet50", "mobilenet_v3_large", "vit_b_16", "vit_l_16", "bert-base", "gpt2"]
VARIANTS = {"per-run streams (ORT's default)": {"use_ep_level_unified_stream": "0"},
            "one stream per session (modelcache's default)": {"use_ep_level_unified_stream": "1"}}


def one(variant: str, sim: bool) -> dict:
    import numpy as np
    import modelcache as mc
    provider_options = VARIANTS[variant]
    if sim:
        import onnx
        from modelcache.tools.families import make_family, sample_input
        folder, names = "/tmp/stream-memory-sim", ["resnet-0", "bert-0", "mobilenet-0"]
        os.makedirs(folder, exist_ok=True)
        feeds = {}
        for n in names:
            proto = make_family(n.split("-")[0], seed=0)
            onnx.save(proto, f"{folder}/{n}.onnx")
            feeds[n] = sample_input(proto, seed=1)
        cache = mc.ModelCache(monitor=mc.SimulatedDevice("1GiB", session_overhead="1MiB", run_overhead="1MiB"),
                              device_budget="900MiB", reserve=0, watch_interval=None)
    else:
        import onnxruntime as ort
        import zoo
        folder, names = ZOO_DIR, NAMES
        feeds = {n: zoo.sample_feed(ort.InferenceSession(f"{folder}/{n}.onnx", providers=["CPUExecutionProvider"]))
                 for n in names}
        cache = mc.ModelCache(device=0, device_budget="60GiB", reserve=0, watch_interval=None)
    mon = cache.monitor
    for n in names:
        cache.register(n, f"{folder}/{n}.onnx", backend="onnxruntime", provider_options=provider_options)
    refs = {}
    for n in names:
        with cache.use(n, timeout=600) as m:
            refs[n] = m.run(None, feeds[n])[0]
        assert float(np.std(refs[n])) > 0, f"{n}: degenerate reference output"
    wrong = [0]

    def gap() -> int:
        with cache._lock:
            books = cache._ledger.accounted_bytes()
        return round(((mon.process_bytes() or 0) - books) / MiB)

    def request(n: str) -> None:
        with cache.use(n, timeout=600) as m:
            out = m.run(None, feeds[n])[0]
        if not np.array_equal(out, refs[n]):
            wrong[0] += 1

    def threaded(pick, k: int = 40) -> float:
        def work(i: int) -> None:
            for r in range(k):
                request(pick(i, r))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return round(8 * k / (time.perf_counter() - t0), 1)

    row = {"variant": variant, "provider_options": provider_options}
    row["gap_sequential_MiB"] = gap()
    row["mixed_req_per_s"] = threaded(lambda i, r: names[(i + r) % len(names)])
    row["gap_after_mixed_MiB"] = gap()
    row["one_model_req_per_s"] = threaded(lambda i, r: names[-2])
    row["gap_after_one_model_MiB"] = gap()
    runs = {}
    for n in names:
        with cache.use(n, timeout=600) as m:
            ts = []
            for _ in range(60):
                t0 = time.perf_counter()
                m.run(None, feeds[n])
                ts.append(time.perf_counter() - t0)
        runs[n] = round(statistics.median(ts[10:]) * 1e3, 3)
    row["run_ms"] = runs
    row["wrong_outputs"] = wrong[0]
    cache.close()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--sim", action="store_true", help="the CPU builders on a simulated device (a dry run)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(one(a.variant, a.sim)))
        return 0
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + (["--sim"] if a.sim else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:])
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
