"""GPU diagnostics behind docs/gpu-results-h200-2026-12-04.md (its exp.json): for each zoo model,
(1) interleaved medians of the run through use() and of its parts (bare bind-and-run, with the
device context, with the gate, the caller-thread path, a hand-off to the runner, the input check)
next to a plain session; (2) blocks of 100 sequential runs of plain, use() and bind-and-run;
(3) the first two runs after a 20 ms idle gap, after new bindings, after a swap-in, after a swap-in
whose weights were read once on the device; (4) two plain sessions of one model (algorithm-search
noise). Needs a GPU and the zoo (``python benchmarks/zoo.py --export-only``).

    python benchmarks/run_order.py --zoo /tmp/modelcache-zoo --models resnet50,bert-base,mobilenet_v3_large --json exp.json
"""
import argparse, sys, time, statistics, os, threading, json
sys.path.insert(0, os.path.dirname(__file__)); sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import modelcache as mc, zoo, numpy as np
import onnxruntime as ort
p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--zoo", default="/tmp/modelcache-zoo")
p.add_argument("--models", default="resnet50,bert-base,mobilenet_v3_large")
p.add_argument("--json")
args = p.parse_args()
ort.preload_dlls()
res={}
cache=mc.ModelCache(device=0, device_budget="60GiB", reserve=0, watch_interval=None)
memory=cache.monitor.memory
for name in args.models.split(","):
    path=os.path.join(args.zoo, f"{name}.onnx")
    cache.register(name,path,backend="onnxruntime")
    plain=ort.InferenceSession(path, providers=["CUDAExecutionProvider","CPUExecutionProvider"])
    feed=zoo.sample_feed(plain)
    lease=cache.use(name); held=lease.acquire()
    held.run(None,feed)
    outs=[o.name for o in held.get_outputs()]
    checked=held._checked(feed)
    r={"caller": threading.get_ident() in held._callers._threads, "callers": list(held._callers._threads), "joining": held._callers._joining}
    ctx=held._context
    def ctx_direct():
        with ctx(): return held._bind_and_run(outs,checked,None)
    steps={"plain":lambda: plain.run(None,feed),"mc":lambda: held.run(None,feed),"direct":lambda: held._bind_and_run(outs,checked,None),
     "ctx_direct":ctx_direct,
     "gated":lambda: held._gated(held._bind_and_run,outs,checked,None,thread=threading.get_ident()),
     "on_runner":lambda: held._on_runner(held._bind_and_run,outs,checked,None),
     "runner_hop":lambda: held._runner.call(held._bind_and_run,outs,checked,None),
     "checked":lambda: held._checked(feed)}
    t={k:[] for k in steps}
    for i in range(300):
        keys=list(steps)
        for k in range(len(keys)):
            key=keys[(i+k)%len(keys)]
            s=time.perf_counter(); steps[key](); t[key].append(time.perf_counter()-s)
    r["us"]={k: round(statistics.median(v)*1e6,1) for k,v in t.items()}
    # sequential blocks (no interleaving): 100 plain then 100 mc then 100 direct
    seq={}
    for key in ("plain","mc","direct","plain","mc","direct"):
        v=[]
        for _ in range(100):
            s=time.perf_counter(); steps[key](); v.append(time.perf_counter()-s)
        seq.setdefault(key,[]).append(round(statistics.median(v)*1e6,1))
    r["sequential_us"]=seq
    # first runs: (a) after a 20 ms idle gap, same binding; (b) a new binding, same buffer; (c) evict/swap-in
    def first(fn, prep, n=8):
        out=[]
        for _ in range(n):
            prep()
            s=time.perf_counter(); fn(); a=time.perf_counter()-s
            s=time.perf_counter(); fn(); b=time.perf_counter()-s
            out.append((a,b))
        return [round(statistics.median(x[0] for x in out)*1e6), round(statistics.median(x[1] for x in out)*1e6)]
    r["idle_gap_20ms"]=first(lambda: held.run(None,feed), lambda: time.sleep(0.02))
    def newbind():
        held._bindings.clear(); held.prime()
    r["new_binding"]=first(lambda: held.run(None,feed), newbind)
    lease.release()
    fr=[]
    for _ in range(8):
        cache.evict(name)
        l=cache.use(name); m=l.acquire()
        s=time.perf_counter(); m.run(None,feed); a=time.perf_counter()-s
        s=time.perf_counter(); m.run(None,feed); b=time.perf_counter()-s
        fr.append((a,b)); l.release()
    r["after_swap_in"]=[round(statistics.median(x[0] for x in fr)*1e6), round(statistics.median(x[1] for x in fr)*1e6)]
    # after a swap-in, then a D2D touch of the weights buffer
    h=cache._entries[name].handle
    fr=[]
    rt=__import__("cuda.bindings.runtime",fromlist=["x"])
    for _ in range(8):
        cache.evict(name)
        l=cache.use(name); m=l.acquire()
        buf=h.device_weights
        tmp=memory.allocate(buf.nbytes); 
        rt.cudaMemcpyAsync(tmp.ptr, buf.ptr, buf.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, memory.streams.get(0).handle); memory.synchronize(); tmp.free()
        s=time.perf_counter(); m.run(None,feed); a=time.perf_counter()-s
        s=time.perf_counter(); m.run(None,feed); b=time.perf_counter()-s
        fr.append((a,b)); l.release()
    r["after_swap_in_touched"]=[round(statistics.median(x[0] for x in fr)*1e6), round(statistics.median(x[1] for x in fr)*1e6)]
    # two sessions of one config: algorithm-search noise
    so=ort.SessionOptions()
    p2=ort.InferenceSession(path, providers=["CUDAExecutionProvider","CPUExecutionProvider"])
    p2.run(None,feed)
    v1,v2=[],[]
    for _ in range(200):
        s=time.perf_counter(); plain.run(None,feed); v1.append(time.perf_counter()-s)
        s=time.perf_counter(); p2.run(None,feed); v2.append(time.perf_counter()-s)
    r["two_plain_sessions_us"]=[round(statistics.median(v1)*1e6,1), round(statistics.median(v2)*1e6,1)]
    res[name]=r
    print(name, json.dumps(r), flush=True)
    cache.evict(name)
if args.json:
    json.dump(res, open(args.json, "w"), indent=1)
