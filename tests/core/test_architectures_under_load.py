"""Many architectures on one device (the CPU builders, on a simulated device that charges sessions):
room is found whenever it exists, waiters are served in turn, the budget holds."""
import threading

import numpy as np
import pytest

import modelcache as mc
from conftest import run_threads

ort = pytest.importorskip("onnxruntime")
from modelcache.tools.families import make_bert, make_family, make_mobilenet, make_resnet, sample_input  # noqa: E402

SESSION = 256 << 10        # what a session costs on the simulated device (like ~130 MiB on an H100, scaled)
RUN = 128 << 10            # what a run takes while it runs (activations, workspaces)


def zoo():
    """14 models of 5 architectures: three families at two sizes (or fine-tunes), and a larger BERT."""
    models = {}
    for seed in range(3):
        models[f"resnet-{seed}"] = make_family("resnet", seed=seed)
        models[f"bert-{seed}"] = make_family("bert", seed=seed)
        models[f"mobilenet-{seed}"] = make_family("mobilenet", seed=seed)
    models["resnet-wide"] = make_resnet(width=24, blocks=2, image=32, seed=7)
    models["mobilenet-wide"] = make_mobilenet(width=24, blocks=2, image=32, seed=7)
    models["bert-big"] = make_bert(hidden=128, layers=4, heads=4, vocab=2048, seq=16, seed=9)
    models["bert-big-2"] = make_bert(hidden=128, layers=4, heads=4, vocab=2048, seq=16, seed=10)
    models["resnet-wide-2"] = make_resnet(width=24, blocks=2, image=32, seed=8)
    return models


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, model in zoo().items():
        feed = sample_input(model, seed=1)
        alone = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        out[name] = (model, feed, alone)
    return out


def register_all(cache, models):
    for name, (model, _, _) in models.items():
        cache.register(name, model, backend="onnxruntime", weights_threshold=4096)


def biggest_need(models):
    return max(sum(int(np.prod(i.dims)) * 4 for i in m.graph.initializer) for m, _, _ in models.values())


def test_a_lone_thread_never_waits_for_room_that_exists(models):
    """The budget holds the largest model only once every other model and every parked session
    has left: each use still gets its room at once (no wait, no DeviceBusyError)."""
    budget = int(biggest_need(models) * 1.1) + SESSION + RUN     # the largest, its session and a run
    device = mc.SimulatedDevice("256MiB", session_overhead=SESSION, run_overhead=RUN)
    with mc.ModelCache(monitor=device, device_budget=budget, reserve=0, watch_interval=None) as cache:
        register_all(cache, models)
        for _ in range(2):
            for name, (_, feed, alone) in models.items():
                with cache.use(name, timeout=5) as model:
                    np.testing.assert_allclose(model.run(None, feed)[0], alone[0], rtol=1e-4, atol=1e-4)
        stats = cache.stats()
        assert stats["waits.room"] == 0 and stats["errors.busy"] == 0
        assert device.peak_process_bytes <= budget
        assert stats["unparks"] > 0        # sessions shared by fine-tunes were dropped to make room


def test_eight_threads_on_five_architectures_stay_within_the_budget(models):
    budget = int(biggest_need(models) * 2.5) + 4 * SESSION
    device = mc.SimulatedDevice("256MiB", session_overhead=SESSION, run_overhead=RUN)
    names = list(models)
    errors, served = [], []
    with mc.ModelCache(monitor=device, device_budget=budget, reserve=0, watch_interval=None) as cache:
        register_all(cache, models)

        def worker(seed):
            rng = np.random.default_rng(seed)
            for _ in range(25):
                name = names[int(rng.zipf(1.3)) % len(names)]
                _, feed, alone = models[name]
                try:
                    with cache.use(name, timeout=60) as model:
                        got = model.run(None, feed)[0]
                    np.testing.assert_allclose(got, alone[0], rtol=1e-4, atol=1e-4 * float(np.abs(alone[0]).max()))
                    served.append(name)
                except Exception as exc:
                    errors.append(f"{name}: {exc!r}")

        run_threads(worker, [(s,) for s in range(8)], timeout=120)
        assert not errors, errors[:3]
        assert len(served) == 8 * 25 and len(set(served)) >= 10
        assert device.peak_process_bytes <= budget          # weights, sessions and runs' working memory
        assert device.allocations().get("working memory", 0) == 0     # given back when the runs ended
        assert cache.stats()["evictions"] > 0


def test_a_burst_of_first_swap_ins_of_six_architectures_stays_within_the_budget(models):
    """Sessions not yet measured are planned with the device's estimate: six first swap-ins at
    once do not overshoot."""
    picks = ["resnet-0", "bert-0", "mobilenet-0", "resnet-wide", "mobilenet-wide", "bert-big"]
    budget = int(biggest_need(models) * 3) + 3 * SESSION
    device = mc.SimulatedDevice("256MiB", session_overhead=SESSION, run_overhead=RUN)
    with mc.ModelCache(monitor=device, device_budget=budget, reserve=0, watch_interval=None) as cache:
        register_all(cache, {n: models[n] for n in picks})
        for name in picks:
            cache.prefetch(name, tier=mc.Tier.HOST).result()
        start = threading.Barrier(len(picks))
        errors = []

        def first_use(name):
            start.wait()
            try:
                with cache.use(name, timeout=60) as model:
                    model.run(None, models[name][1])
            except Exception as exc:
                errors.append(repr(exc))

        run_threads(first_use, [(n,) for n in picks], timeout=120)
        assert not errors, errors
        assert device.peak_process_bytes <= budget
        assert cache.stats()["onnxruntime.sessions.created"] == 6


def test_waiters_are_served_in_turn():
    """A swap-in that needs many victims is not starved by smaller, newer ones: while it waits,
    newer swap-ins line up behind it."""
    device = mc.SimulatedDevice(10_000)
    order = []
    with mc.ModelCache(monitor=device, device_budget=1000, reserve=0, watch_interval=None) as cache:
        for i in range(4):
            cache.register(f"small{i}", np.zeros(250, np.uint8))
        cache.register("big", np.zeros(1000, np.uint8))
        cache.register("late", np.zeros(250, np.uint8))
        leases = [cache.use(f"small{i}") for i in range(4)]
        for lease in leases:
            lease.acquire()                         # the device is full of leased models
        done = threading.Event()

        def use(name):
            with cache.use(name, timeout=10):
                order.append(name)
            if name == "big":
                done.set()

        big = threading.Thread(target=use, args=("big",))
        big.start()
        threading.Event().wait(0.2)                 # big waits for room
        late = threading.Thread(target=use, args=("late",))
        late.start()
        threading.Event().wait(0.2)
        leases[0].release()                         # room for "late", but "big" waits longer
        threading.Event().wait(0.2)
        assert order == []                          # late lines up behind big
        for lease in leases[1:]:
            lease.release()
        big.join(10)
        late.join(10)
        assert order == ["big", "late"]
