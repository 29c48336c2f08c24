"""ModelCache's arguments."""

import pytest

import modelcache as mc


def test_config_errors(device):
    with pytest.raises(mc.ConfigError, match="reserve"):
        mc.ModelCache(monitor=device, reserve=1000)
    with pytest.raises(mc.ConfigError, match="device_budget"):
        mc.ModelCache(monitor=device, device_budget=2000, reserve=0)
    with pytest.raises(mc.ConfigError, match="device=3"):
        mc.ModelCache(device=3, monitor=device)
    cache = mc.ModelCache(monitor=device, device_budget="50%", reserve="10%", watch_interval=None)
    assert (cache.device_budget_bytes, cache.reserve_bytes) == (500, 100)
    cache.close()
    cache = mc.ModelCache(monitor=device, reserve=100, watch_interval=None)
    assert cache.device_budget_bytes == 900      # total minus reserve
    cache.close()


def test_no_gpu_error_says_what_to_do():
    if _nvml_works():
        pytest.skip("this machine has a GPU")
    with pytest.raises(mc.MonitorError, match="SimulatedDevice"):
        mc.ModelCache()


def _nvml_works():
    try:
        mc.NvmlMonitor(0).close()
        return True
    except mc.MonitorError:
        return False
