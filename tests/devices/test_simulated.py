"""The simulated device."""
import threading
import time

import pytest

import modelcache as mc


def test_simulated_link_is_shared_by_concurrent_copies():
    """SimulatedDevice.copy takes nbytes / bandwidth alone, and twice that when two copies share
    the link (lower bounds only: sleeps never end early)."""
    device = mc.SimulatedDevice(1000, link_bytes_per_s=100e6)
    start = time.perf_counter()
    device.copy(5_000_000)
    alone = time.perf_counter() - start
    took = []

    def copy():
        t0 = time.perf_counter()
        device.copy(5_000_000)
        took.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=copy) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert alone >= 0.05 and min(took) >= 0.095
    mc.SimulatedDevice(1000).copy(10**12)     # no link: free


def test_an_arena_keeps_runs_working_memory_until_shrunk_and_then_gives_back_its_share():
    from modelcache.devices.simulated import SimulatedDevice
    MiB = 1 << 20
    device = SimulatedDevice("64MiB", arena_keeps=0.25)
    memory = device.memory
    assert memory.has_arena()
    memory.begin_working(8 * MiB, "a")
    memory.begin_working(4 * MiB, "b")             # two runs at once: the arena grows to both
    assert device.process_bytes() == 12 * MiB
    memory.end_working("a")
    memory.end_working("b")
    assert device.process_bytes() == 12 * MiB      # kept for later runs
    memory.begin_working(10 * MiB, "c")            # taken from what the arena holds: no growth
    assert device.process_bytes() == 12 * MiB
    memory.end_working("c")
    _, released = memory.measure_release(memory.shrink_arena)
    assert released == 9 * MiB and device.process_bytes() == 3 * MiB   # all but a quarter of the free 12
    memory.begin_working(5 * MiB, "d")             # 3 free: grows by 2
    assert device.process_bytes() == 5 * MiB
    memory.end_working("d")
    plain = SimulatedDevice("64MiB").memory
    assert not plain.has_arena()
    plain.begin_working(8 * MiB, "a")
    plain.end_working("a")
    assert plain.device.process_bytes() == 0 and plain.measure_release(plain.shrink_arena) == (None, 0)


@pytest.mark.parametrize("arena_keeps", [None, 0.5])
def test_a_run_whose_working_memory_does_not_fit_names_its_model_and_the_cache_serves_on(tmp_path, arena_keeps):
    """Memory taken outside the cache fills the device: the run that cannot get its working
    memory fails with DeviceOutOfMemoryError naming its model, and it runs again once there is
    room."""
    import numpy as np
    from modelcache.tools.generate import make_mlp, save_model
    MiB = 1 << 20
    device = mc.SimulatedDevice("64MiB", run_overhead="8MiB", arena_keeps=arena_keeps)
    path = save_model(make_mlp(256, 2, seed=3), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    with mc.ModelCache(monitor=device, reserve=0, watch_interval=None) as cache:
        cache.register("m", path, weights_threshold=4096)
        with cache.use("m") as model:
            expected = model.run(None, {"x": x})[0]
        device.memory.shrink_arena()                    # the arena's share goes back
        other = device.allocate(device.free_bytes() - 1 * MiB, owner="another process", external=True)
        with cache.use("m") as model:
            with pytest.raises(mc.DeviceOutOfMemoryError) as caught:
                model.run(None, {"x": x})
        assert caught.value.model == "m" and "working memory" in str(caught.value)
        other.free()
        with cache.use("m") as model:
            np.testing.assert_array_equal(model.run(None, {"x": x})[0], expected)


@pytest.mark.parametrize("nbytes", [1, 1000, 3 << 20, 11 << 20])
def test_buffers_and_host_blocks_start_aligned_as_cuda_memory(nbytes):
    """cudaMalloc's and cudaHostAlloc's memory starts at multiples of 256 bytes; numpy's at 16.
    ONNX Runtime's CPU kernels ran a ResNet-like builder 12-13 % slower from weights aligned so."""
    memory = mc.SimulatedDevice("1GiB").memory
    buffers = [memory.allocate(nbytes, owner="m") for _ in range(8)]
    pool = memory.new_host_pool()
    blocks = [pool.get(nbytes) for _ in range(8)]
    for held in buffers + blocks:
        assert held.ptr % 256 == 0 and held.array.ctypes.data == held.ptr
        assert held.array.nbytes >= nbytes
        held.array[:nbytes] = 7              # writable to its last byte
    for b in buffers:
        b.free()
    for block in blocks:
        pool.put(block)
    pool.close()
