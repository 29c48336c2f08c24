"""Observability: duration histograms behind stats(), stats() surviving a failing device monitor,
and the Prometheus collector (modelcache.metrics)."""
import subprocess
import sys
import textwrap

import pytest

import modelcache as mc
from modelcache.stats import BUCKETS, DURATIONS, Recorder
from conftest import array_loader


@pytest.fixture
def prom():
    return pytest.importorskip("prometheus_client")


def scrape(prom, cache, **kw):
    """A fresh registry holding a collector of ``cache``; and the collector."""
    from modelcache.metrics import register
    registry = prom.CollectorRegistry()
    return registry, register(cache, registry, **kw)


def use(cache, *names):
    for name in names:
        with cache.use(name):
            pass


class FlakyDevice(mc.SimulatedDevice):
    """A simulated device whose readings raise while ``failing`` is set (as NVML does when the
    driver goes away); allocations and ``free_bytes`` keep working, so the cache still moves models."""

    failing = False

    def reading(self):
        if self.failing:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return super().reading()


# ---------------------------------------------------------------------------- histograms (stats.py)
def test_recorder_histogram_buckets_are_cumulative_and_inclusive():
    record = Recorder()
    for seconds in (0.0001, 0.001, 0.0011, 0.3, 0.3, 59.0, 600.0):
        record.observe("swap_in", seconds)
    hist = record.histograms()["swap_in"]
    counts = dict(hist.buckets)
    assert [b for b, _ in hist.buckets] == list(BUCKETS) and BUCKETS[-1] == float("inf")
    assert counts[0.0005] == 1
    assert counts[0.001] == 2            # an upper bound is inclusive (Prometheus' le)
    assert counts[0.0025] == 3
    assert counts[0.25] == 3 and counts[0.5] == 5
    assert counts[30.0] == 5 and counts[60.0] == 6
    assert counts[float("inf")] == hist.count == 7
    assert hist.sum == pytest.approx(0.0001 + 0.001 + 0.0011 + 0.6 + 59.0 + 600.0)
    assert record.histograms()["load"].count == 0 and set(record.histograms()) == set(DURATIONS)


def test_histograms_are_never_windowed():
    record = Recorder()
    for _ in range(5000):                 # more than the 4,096 samples the percentiles keep
        record.observe("load", 0.002)
    record.observe("load", 2.0)
    hist = record.histograms()["load"]
    assert hist.count == 5001 and dict(hist.buckets)[0.0025] == 5000
    assert record.snapshot()["load.count"] == 5001 and record.snapshot()["load.seconds.max"] == 2.0


def test_cache_histograms_match_its_moves(make_cache, tmp_path):
    cache = make_cache(device_budget=200, disk_dir=tmp_path / "disk")
    for name in "abc":
        cache.register(name, array_loader(ord(name)))
    use(cache, "a", "b", "a", "c", "a")              # c evicts b; a stays (used last before c)
    cache.evict("b", mc.Tier.DISK)
    use(cache, "b")                                    # disk -> host -> device
    stats, hists = cache.stats(), cache._record.histograms()
    assert stats["loads"] == 3 and hists["load"].count == 3
    assert hists["swap_in"].count == stats["misses"] == 4
    assert hists["to_disk"].count == stats["demotions.disk"] == 1 and hists["from_disk"].count == 1
    assert hists["swap_out"].count == stats["evictions"] == 2
    for kind in DURATIONS:
        counts = [n for _, n in hists[kind].buckets]
        assert counts == sorted(counts) and counts[-1] == stats[f"{kind}.count"]
        assert hists[kind].sum == pytest.approx(stats[f"{kind}.seconds.total"])


# ---------------------------------------------------------------------------- a failing monitor
def test_stats_and_status_survive_a_failing_monitor(make_cache):
    device = FlakyDevice(1000)
    cache = make_cache(monitor=device)
    cache.register("a", array_loader(1))
    use(cache, "a")
    before = cache.stats()
    assert before["device.monitor_errors"] == 0 and before["device.free_bytes"] == 900
    assert cache.status()["monitor_error"] is None
    device.failing = True
    stats = cache.stats()
    for key in ("device.total_bytes", "device.free_bytes", "device.used_bytes", "device.process_bytes"):
        assert key not in stats
    assert type(stats["device.monitor_errors"]) is int and stats["device.monitor_errors"] == 1
    assert stats["device.working_bytes"] == 0 and stats["device.budget_bytes"] == 400
    assert stats["misses"] == 1 and stats["models.device"] == 1 and stats["device.bytes"] == 100
    status = cache.status()
    assert status["monitor_error"] == "RuntimeError: NVML_ERROR_GPU_IS_LOST"
    assert status["stats"]["device.monitor_errors"] == 2
    use(cache, "a")                                   # the cache itself goes on
    device.failing = False
    stats = cache.stats()
    assert stats["device.free_bytes"] == 900 and stats["device.monitor_errors"] == 2
    assert cache.status()["monitor_error"] == "RuntimeError: NVML_ERROR_GPU_IS_LOST"   # the last one, kept


def test_stats_survive_a_failing_working_memory_reading(make_cache, device, monkeypatch):
    cache = make_cache()

    def broken():
        raise OSError("gone")
    monkeypatch.setattr(device.memory, "working_bytes", broken)
    stats = cache.stats()
    assert "device.working_bytes" not in stats and stats["device.free_bytes"] == 1000
    assert stats["device.monitor_errors"] == 1 and cache.status()["monitor_error"] == "OSError: gone"


# ---------------------------------------------------------------------------- the collector
def test_counters_follow_hits_misses_loads_and_evictions(make_cache, prom):
    cache = make_cache(device_budget=200)
    for name in "abc":
        cache.register(name, array_loader(ord(name)))
    registry, _ = scrape(prom, cache)
    value = registry.get_sample_value
    assert value("modelcache_hits_total") == 0 and value("modelcache_loads_total") == 0
    use(cache, "a", "b", "a", "a", "c")               # 2 hits; c evicts b for room
    cache.evict("a")                                   # explicit
    assert value("modelcache_hits_total") == 2
    assert value("modelcache_misses_total") == 3
    assert value("modelcache_loads_total") == 3
    assert value("modelcache_evictions_total", {"reason": "room"}) == 1
    assert value("modelcache_evictions_total", {"reason": "explicit"}) == 1
    assert value("modelcache_evictions_total", {"reason": "pressure"}) == 0
    assert value("modelcache_errors_total", {"kind": "busy"}) == 0
    assert value("modelcache_models", {"tier": "device"}) == 1
    assert value("modelcache_models", {"tier": "host"}) == 2
    assert value("modelcache_device_bytes") == 100 and value("modelcache_host_bytes") == 200
    assert value("modelcache_device_budget_bytes") == 200
    assert value("modelcache_device_free_bytes") == 900
    assert value("modelcache_model_hits_total", {"model": "a"}) == 2
    assert value("modelcache_model_misses_total", {"model": "b"}) == 1
    assert value("modelcache_model_device_bytes", {"model": "c"}) == 100
    assert value("modelcache_model_tier", {"model": "c", "tier": "device"}) == 1
    assert value("modelcache_model_tier", {"model": "a", "tier": "device"}) == 0
    assert value("modelcache_model_tier", {"model": "a", "tier": "host"}) == 1
    with cache.use("c"):
        assert value("modelcache_leases_active") == 1
    assert value("modelcache_collect_errors_total") == 0


def test_busy_errors_are_counted(make_cache, prom):
    cache = make_cache(device_budget=100)
    cache.register("a", array_loader(1))
    cache.register("b", array_loader(2))
    registry, _ = scrape(prom, cache)
    with cache.use("a"):
        with pytest.raises(mc.DeviceBusyError):
            with cache.use("b", timeout=0.05):
                pass
    assert registry.get_sample_value("modelcache_errors_total", {"kind": "busy"}) == 1


def test_histograms_are_exported_consistently(make_cache, prom):
    cache = make_cache(device_budget=200)
    for name in "abcd":
        cache.register(name, array_loader(ord(name)))
    use(cache, "a", "b", "c", "d", "a", "a")           # 5 swap-ins, 4 loads
    registry, _ = scrape(prom, cache)
    value = registry.get_sample_value
    assert value("modelcache_load_seconds_count") == 4
    assert value("modelcache_swap_in_seconds_count") == 5
    assert value("modelcache_swap_out_seconds_count") == 3
    for kind, n in (("load", 4), ("swap_in", 5), ("swap_out", 3), ("to_disk", 0)):
        counts = [value(f"modelcache_{kind}_seconds_bucket", {"le": le})
                  for le in ("0.0005", "0.01", "0.1", "1.0", "10.0", "60.0", "+Inf")]
        assert None not in counts and counts == sorted(counts) and counts[-1] == n
        assert value(f"modelcache_{kind}_seconds_sum") == pytest.approx(cache.stats()[f"{kind}.seconds.total"])
    text = prom.generate_latest(registry).decode()
    assert text.count('modelcache_swap_in_seconds_bucket{le=') == len(BUCKETS)


def test_cardinality_cap_sums_the_rest_under_other(make_cache, prom):
    cache = make_cache(device_budget=500)
    uses = {"m0": 1, "m1": 5, "m2": 2, "m3": 4, "m4": 3}
    for name in uses:
        cache.register(name, array_loader(int(name[1])))
    for name, n in uses.items():
        use(cache, *[name] * n)
    registry, _ = scrape(prom, cache, max_models=2)
    value = registry.get_sample_value
    text = prom.generate_latest(registry).decode()
    assert sorted(set(line.split('model="')[1].split('"')[0] for line in text.splitlines()
                      if line.startswith("modelcache_model_hits_total{"))) == ["_other", "m1", "m3"]
    assert value("modelcache_model_hits_total", {"model": "m1"}) == 4
    assert value("modelcache_model_hits_total", {"model": "m3"}) == 3
    assert value("modelcache_model_hits_total", {"model": "_other"}) == 0 + 1 + 2
    assert value("modelcache_model_misses_total", {"model": "_other"}) == 3
    assert value("modelcache_model_loads_total", {"model": "_other"}) == 3
    assert value("modelcache_model_device_bytes", {"model": "_other"}) == 300
    assert value("modelcache_model_tier", {"model": "_other", "tier": "device"}) == 3
    total_hits = sum(value("modelcache_model_hits_total", {"model": m}) for m in ("m1", "m3", "_other"))
    assert total_hits == value("modelcache_hits_total") == 10
    # a model keeps its series: m0 becoming the most used does not move counters between series
    use(cache, *["m0"] * 10)
    assert value("modelcache_model_hits_total", {"model": "m0"}) is None
    assert value("modelcache_model_hits_total", {"model": "_other"}) == 13
    # unregistering frees a slot for the most used of the rest
    cache.unregister("m3")
    assert value("modelcache_model_hits_total", {"model": "m0"}) == 10
    assert value("modelcache_model_hits_total", {"model": "_other"}) == 3


def test_no_models_of_their_own_with_max_models_zero(make_cache, prom):
    cache = make_cache()
    cache.register("a", array_loader(1))
    cache.register("b", array_loader(2))
    use(cache, "a", "b", "b")
    registry, _ = scrape(prom, cache, max_models=0)
    assert registry.get_sample_value("modelcache_model_hits_total", {"model": "_other"}) == 1
    assert registry.get_sample_value("modelcache_model_hits_total", {"model": "b"}) is None
    with pytest.raises(mc.ConfigError):
        scrape(prom, cache, max_models=-1)


def test_collect_survives_a_failing_monitor(make_cache, prom):
    device = FlakyDevice(1000)
    cache = make_cache(monitor=device)
    cache.register("a", array_loader(1))
    registry, collector = scrape(prom, cache)
    use(cache, "a")
    device.failing = True
    families = list(collector.collect())
    assert families
    value = registry.get_sample_value
    assert value("modelcache_device_free_bytes") is None and value("modelcache_device_total_bytes") is None
    assert value("modelcache_monitor_errors_total") == 4        # every scrape reads: 3 above, this one
    assert value("modelcache_device_budget_bytes") == 400 and value("modelcache_misses_total") == 1
    assert value("modelcache_collect_errors_total") == 0
    device.failing = False
    assert value("modelcache_device_free_bytes") == 900


def test_collect_never_raises_when_the_cache_fails(make_cache, prom, monkeypatch):
    cache = make_cache()
    cache.register("a", array_loader(1))
    use(cache, "a", "a")
    registry, collector = scrape(prom, cache)

    def broken():
        raise RuntimeError("a backend's stats failed")
    monkeypatch.setattr(cache, "stats", broken)
    value = registry.get_sample_value
    assert value("modelcache_loads_total") == 1                 # from the recorder's counters
    assert value("modelcache_swap_in_seconds_count") == 1
    assert value("modelcache_model_hits_total", {"model": "a"}) == 1
    assert value("modelcache_collect_errors_total") == 4        # one per scrape: 4 scrapes above
    monkeypatch.setattr(cache, "entries", broken)
    monkeypatch.setattr(cache._record, "histograms", broken)
    text = prom.generate_latest(registry).decode()
    assert "modelcache_collect_errors_total 7.0" in text and "modelcache_loads_total 1.0" in text


def test_describe_lets_registries_reject_a_clash(make_cache, prom):
    cache = make_cache()
    registry = prom.CollectorRegistry(auto_describe=True)
    from modelcache.metrics import PrometheusCollector, register
    collector = register(cache, registry)
    names = {family.name for family in collector.describe()}
    assert {"modelcache_hits", "modelcache_swap_in_seconds", "modelcache_model_tier"} <= names
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(PrometheusCollector(cache))
    register(cache, registry, namespace="replica2")
    assert registry.get_sample_value("replica2_hits_total") == 0


def test_register_defaults_to_the_global_registry(make_cache, prom, monkeypatch):
    registry = prom.CollectorRegistry()
    monkeypatch.setattr(prom, "REGISTRY", registry)
    from modelcache.metrics import register
    cache = make_cache()
    cache.register("a", array_loader(1))
    use(cache, "a")
    register(cache)
    assert registry.get_sample_value("modelcache_misses_total") == 1


def test_missing_prometheus_client_says_how_to_install(make_cache, monkeypatch):
    from modelcache.metrics import PrometheusCollector
    for module in [m for m in sys.modules if m == "prometheus_client" or m.startswith("prometheus_client.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)       # import raises ImportError
    with pytest.raises(mc.ModelCacheError, match=r"pip install 'modelcache\[prometheus\]'"):
        PrometheusCollector(make_cache())


def test_importing_modelcache_does_not_import_prometheus_client():
    code = textwrap.dedent("""
        import sys
        import modelcache, modelcache.metrics
        assert "prometheus_client" not in sys.modules, sorted(m for m in sys.modules if "prometheus" in m)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
