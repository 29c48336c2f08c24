"""The simulated device."""
import threading
import time

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
