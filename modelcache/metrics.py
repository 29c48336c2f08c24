"""Prometheus metrics for a :class:`~modelcache.ModelCache`: a custom collector that reads the cache
on every scrape (no background thread, nothing on the request path).

Needs ``prometheus_client`` (``pip install 'modelcache[prometheus]'``), imported only when a
collector is made: ``import modelcache`` does not import it. Usage::

    import prometheus_client
    from modelcache.metrics import register

    register(cache)                                  # into prometheus_client.REGISTRY
    prometheus_client.start_http_server(9100)        # or, in FastAPI:
    app.mount("/metrics", prometheus_client.make_asgi_app())

``register(cache, registry=my_registry, max_models=50, namespace="myapp")`` picks another registry,
cap or prefix. Two caches in one registry need two namespaces (the names would collide).

Metrics (``modelcache`` is the namespace; bytes and seconds). Counters and histograms count since
the cache was made, so they add up across replicas:

- ``modelcache_hits_total``, ``modelcache_misses_total``: leases that found the model on the device
  / had to wait for a load or swap-in.
- ``modelcache_loads_total``: loader calls.
- ``modelcache_evictions_total{reason}``: ``room`` (for another model), ``pressure`` (over budget
  or under the reserve), ``explicit`` (``evict()``).
- ``modelcache_demotions_total{to}``: models moved further down, to ``disk`` or ``unloaded``.
- ``modelcache_errors_total{kind}``: ``busy`` (no room in time), ``move``, ``disk``, ``load``.
- ``modelcache_waits_room_total``, ``modelcache_host_serves_total``, ``modelcache_unparks_total``.
- ``modelcache_monitor_errors_total``: device readings that raised (the device gauges are then
  missing from that scrape).
- ``modelcache_collect_errors_total``: parts of a scrape that failed (the rest is still exported).
- Histograms ``modelcache_load_seconds``, ``modelcache_swap_in_seconds``,
  ``modelcache_swap_out_seconds``, ``modelcache_to_disk_seconds``, ``modelcache_from_disk_seconds``
  (buckets: :data:`modelcache.stats.BUCKETS`).
- Gauges ``modelcache_device_bytes`` (the models' device bytes, parked ones included),
  ``modelcache_device_accounted_bytes``, ``modelcache_device_budget_bytes``,
  ``modelcache_device_reserve_bytes``, ``modelcache_device_total_bytes``,
  ``modelcache_device_free_bytes``, ``modelcache_device_used_bytes`` (all processes; these three
  when the monitor answered), ``modelcache_host_bytes``, ``modelcache_host_budget_bytes``,
  ``modelcache_models{tier}``, ``modelcache_leases_active``.
- Per model: ``modelcache_model_hits_total{model}``, ``modelcache_model_misses_total{model}``,
  ``modelcache_model_loads_total{model}``, ``modelcache_model_device_bytes{model}``,
  ``modelcache_model_host_bytes{model}`` and ``modelcache_model_tier{model,tier}`` (1 for the
  model's tier, 0 for the other three).

Label cardinality: at most ``max_models`` models get series of their own, the rest are summed under
``model="_other"`` (its ``modelcache_model_tier`` counts the models in each tier). Free slots go to
the most used models (leases, then the most recently used); a model keeps its slot while it stays
registered, so no counter moves between series and every counter only grows (one that leaves with
an unregistered model ends; the slot it frees goes to the most used of ``_other``). A model named
``_other`` itself is always counted under ``_other``.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Set

from ._optional import require
from .errors import ConfigError
from .stats import DURATIONS, Number
from .tiers import EntryInfo, Tier

if TYPE_CHECKING:  # pragma: no cover
    from .cache import ModelCache

logger = logging.getLogger("modelcache")

#: the label value of the models beyond ``max_models``
OTHER = "_other"
_INSTALL = "pip install 'modelcache[prometheus]'"
_DURATION_DOCS = {"load": "Loader calls (loader and backend load), seconds.",
                  "swap_in": "Moves host -> device, seconds.", "swap_out": "Moves device -> host, seconds.",
                  "to_disk": "Moves host -> disk, seconds.", "from_disk": "Moves disk -> host, seconds."}


def _prometheus() -> Any:
    """``prometheus_client.core``, or a ModelCacheError saying how to install it."""
    return require("prometheus_client.core", "modelcache.metrics (Prometheus metrics)", _INSTALL)


class PrometheusCollector:
    """A ``prometheus_client`` collector of one cache's metrics (the list is in this module's
    docstring). ``collect()`` never raises: a part that fails is left out of that scrape and
    counted in ``<namespace>_collect_errors_total``.

    Args:
        cache: the cache to read.
        max_models: most models with series of their own (the rest: ``model="_other"``); 0 puts
            every model under ``_other``.
        namespace: prefix of every metric name.
    """

    def __init__(self, cache: "ModelCache", *, max_models: int = 100, namespace: str = "modelcache") -> None:
        if type(max_models) is not int or max_models < 0:
            raise ConfigError(f"max_models={max_models!r} must be an int >= 0")
        if not isinstance(namespace, str) or not namespace.replace("_", "a").isalnum() or namespace[0].isdigit():
            raise ConfigError(f"namespace={namespace!r} must be letters, digits and underscores, "
                              f"not starting with a digit")
        self._core = _prometheus()
        #: a bucket's ``le`` label as prometheus_client writes it (``+Inf``, ``0.5``, ``1.0``)
        self._le: Callable[[float], str] = require("prometheus_client.utils", "modelcache.metrics",
                                                   _INSTALL).floatToGoString
        self.cache, self.max_models, self.namespace = cache, max_models, namespace
        self._lock = threading.Lock()
        self._named: Set[str] = set()        # models with series of their own (sticky while registered)
        self._collect_errors = 0

    # ------------------------------------------------------------------ prometheus_client's interface
    def describe(self) -> Iterator[Any]:
        """Every family's name and type, without samples (so registering reads nothing)."""
        yield from self._families({}, {}, [], with_samples=False)

    def collect(self) -> Iterator[Any]:
        """The metrics now. Never raises."""
        with self._lock:
            stats = self._read("stats", self.cache.stats, None)
            if stats is None:       # e.g. a backend's stats raised: the recorder's counters still count
                stats = self._read("counters", self.cache._record.snapshot, {})
            histograms = self._read("histograms", self.cache._record.histograms, {})
            entries = self._read("entries", self.cache.entries, [])
            try:
                families = list(self._families(stats, histograms, entries, with_samples=True))
            except Exception:
                self._failed("families")
                families = []
            collect_errors = self._core.CounterMetricFamily(
                self._name("collect_errors"), "Parts of a scrape that failed (left out of it).",
                value=self._collect_errors)
        yield from families
        yield collect_errors

    # ------------------------------------------------------------------ reading
    def _read(self, what: str, fn: Callable[[], Any], default: Any) -> Any:
        try:
            return fn()
        except Exception:
            self._failed(what)
            return default

    def _failed(self, what: str) -> None:
        self._collect_errors += 1
        log = logger.warning if self._collect_errors == 1 else logger.debug
        log("modelcache metrics: reading the cache's %s failed (left out of this scrape)", what, exc_info=True)

    def _name(self, name: str) -> str:
        return f"{self.namespace}_{name}"

    def _choose(self, entries: List[EntryInfo]) -> Set[str]:
        """Lock held: the models with series of their own (see the module docstring)."""
        present = {e.name for e in entries}
        self._named &= present
        free = self.max_models - len(self._named)
        if free > 0:
            rest = [e for e in entries if e.name not in self._named and e.name != OTHER]
            rest.sort(key=lambda e: (-(e.hits + e.misses), -(e.last_used or 0.0), e.name))
            self._named.update(e.name for e in rest[:free])
        return set(self._named)

    # ------------------------------------------------------------------ the families
    def _families(self, stats: Dict[str, Number], histograms: Dict[str, Any], entries: List[EntryInfo],
                  *, with_samples: bool) -> Iterable[Any]:
        core = self._core

        def counter(name: str, doc: str, key: Optional[str] = None, labels: Optional[List[str]] = None,
                    series: Optional[Dict[Any, Optional[str]]] = None) -> Any:
            family = core.CounterMetricFamily(self._name(name), doc, labels=labels)
            if with_samples:
                if series is None and key is not None and key in stats:
                    family.add_metric([], stats[key])
                for label_values, k in (series or {}).items():
                    if k in stats:
                        family.add_metric(list(label_values), stats[k])
            return family

        def gauge(name: str, doc: str, key: Optional[str] = None, labels: Optional[List[str]] = None) -> Any:
            family = core.GaugeMetricFamily(self._name(name), doc, labels=labels)
            if with_samples and key is not None and key in stats:
                family.add_metric([], stats[key])
            return family

        yield counter("hits", "Leases that found the model on the device.", "hits")
        yield counter("misses", "Leases that waited for a load or swap-in.", "misses")
        yield counter("loads", "Loader calls.", "loads")
        yield counter("evictions", "Models moved off the device, by reason.", labels=["reason"],
                      series={(r,): f"evictions.{r}" for r in ("room", "pressure", "explicit")})
        yield counter("demotions", "Models moved below the host, by where to.", labels=["to"],
                      series={("disk",): "demotions.disk", ("unloaded",): "demotions.unloaded"})
        yield counter("errors", "Failures, by kind.", labels=["kind"],
                      series={("busy",): "errors.busy", ("move",): "errors.move", ("disk",): "errors.disk",
                              ("load",): "load_errors"})
        yield counter("waits_room", "Waits for device room.", "waits.room")
        yield counter("host_serves", "Leases served on the host while the model moved to the device.",
                      "host_serves")
        yield counter("unparks", "Parked models whose kept device bytes (a session) were freed.", "unparks")
        yield counter("monitor_errors", "Device memory readings that raised.", "device.monitor_errors")

        for kind in DURATIONS:
            family = core.HistogramMetricFamily(self._name(f"{kind}_seconds"), _DURATION_DOCS.get(kind, kind))
            histogram = histograms.get(kind)
            if with_samples and histogram is not None:
                family.add_metric([], [(self._le(b), n) for b, n in histogram.buckets], histogram.sum)
            yield family

        yield gauge("device_bytes", "Device bytes the models hold (parked ones included).", "device.bytes")
        yield gauge("device_accounted_bytes", "Device bytes the cache accounts for (moves in flight included).",
                    "device.accounted_bytes")
        yield gauge("device_budget_bytes", "Most device bytes the models may take.", "device.budget_bytes")
        yield gauge("device_reserve_bytes", "Device bytes that must stay free.", "device.reserve_bytes")
        yield gauge("device_total_bytes", "Device memory, bytes.", "device.total_bytes")
        yield gauge("device_free_bytes", "Free device memory (all processes), bytes.", "device.free_bytes")
        yield gauge("device_used_bytes", "Used device memory (all processes), bytes.", "device.used_bytes")
        yield gauge("host_bytes", "Host bytes of parked models.", "host.bytes")
        yield gauge("host_budget_bytes", "Most host bytes for parked models.", "host.budget_bytes")
        yield gauge("leases_active", "Leases held now.", "leases.active")
        models = gauge("models", "Registered models, by tier.", labels=["tier"])
        if with_samples:
            for tier in Tier:
                if f"models.{tier}" in stats:
                    models.add_metric([str(tier)], stats[f"models.{tier}"])
        yield models

        yield from self._model_families(entries if with_samples else [], with_samples)

    def _model_families(self, entries: List[EntryInfo], with_samples: bool) -> Iterable[Any]:
        core = self._core
        named = self._choose(entries) if with_samples else set()
        rows: Dict[str, Dict[str, int]] = {}
        for e in entries:
            label = e.name if e.name in named else OTHER
            row = rows.setdefault(label, dict.fromkeys(("hits", "misses", "loads", "device_bytes", "host_bytes",
                                                        *(str(t) for t in Tier)), 0))
            row["hits"] += e.hits
            row["misses"] += e.misses
            row["loads"] += e.loads
            row["device_bytes"] += e.device_bytes
            row["host_bytes"] += e.host_bytes
            row[str(e.tier)] += 1
        specs = ((core.CounterMetricFamily, "hits", "Leases of the model that found it on the device."),
                 (core.CounterMetricFamily, "misses", "Leases of the model that waited for it."),
                 (core.CounterMetricFamily, "loads", "Loader calls of the model."),
                 (core.GaugeMetricFamily, "device_bytes", "Device bytes the model holds."),
                 (core.GaugeMetricFamily, "host_bytes", "Host bytes the model holds."))
        for make, key, doc in specs:
            family = make(self._name(f"model_{key}"), doc, labels=["model"])
            for label in sorted(rows):
                family.add_metric([label], rows[label][key])
            yield family
        tier = core.GaugeMetricFamily(self._name("model_tier"), "1 for the model's tier, else 0 "
                                      "(for _other: how many of its models are there).", labels=["model", "tier"])
        for label in sorted(rows):
            for t in Tier:
                tier.add_metric([label, str(t)], rows[label][str(t)])
        yield tier


def register(cache: "ModelCache", registry: Optional[Any] = None, **kw: Any) -> PrometheusCollector:
    """A :class:`PrometheusCollector` of ``cache`` (``kw``: its ``max_models``, ``namespace``),
    registered in ``registry`` (None: ``prometheus_client.REGISTRY``)."""
    collector = PrometheusCollector(cache, **kw)
    if registry is None:
        registry = require("prometheus_client", "modelcache.metrics", _INSTALL).REGISTRY
    registry.register(collector)
    return collector
