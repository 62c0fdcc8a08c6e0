"""Prometheus metrics of the registry plugin, with `prometheus_client` itself.

BentoML starts each worker with `PROMETHEUS_MULTIPROC_DIR` set and serves `/metrics` through
prometheus_client's `MultiProcessCollector`, so the metrics are created lazily, inside the worker
(after that variable is set), and merge across workers on BentoML's own `/metrics`. Gauges name a
multiprocess mode; `Info` and `Enum` do not work in that mode, so `registry_model_info` is a gauge
set to 1. prometheus_client cannot delete a series in multiprocess mode: the series of a version
swapped out is set to 0 (query `registry_model_info == 1`), and a dead worker's series go with it.

The `model` label takes only the names the process serves (`serve_models`, called by each host):
any other name is counted as `other`, so no client can grow a series per name it makes up.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Optional

_LOCK = threading.Lock()
_METRICS: Optional["RegistryMetrics"] = None
#: The `model` label value of every name this process does not serve.
OTHER = "other"
_MODELS: set[str] = set()


def serve_models(names: Iterable[str]) -> None:
    """The model names this process serves: the only values the `model` label takes besides `other`."""
    with _LOCK:
        _MODELS.update(names)


def model_label(name: str) -> str:
    """`name` when this process serves it (or serves nothing yet: a command, a test), else `other`."""
    return name if not _MODELS or name in _MODELS else OTHER


class _ModelLabelled:
    """A metric whose first label is `model`, held to `model_label`'s values."""

    def __init__(self, metric: Any):
        self._metric = metric

    def labels(self, *values: Any, **named: Any) -> Any:
        if values:
            values = (model_label(str(values[0])), *values[1:])
        if "model" in named:
            named["model"] = model_label(str(named["model"]))
        return self._metric.labels(*values, **named)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


class RegistryMetrics:
    """The metric objects, created once per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.resolutions = Counter("registry_resolutions_total", "Layer answers during resolutions",
                                   ["model", "layer", "outcome"])
        self.layer_duration = Histogram("registry_layer_duration_seconds", "Time one layer took to answer", ["layer"],
                                        buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.model_info = Gauge("registry_model_info", "1 for the version each worker serves now (0 once swapped out)",
                                ["model", "version", "source", "selector"], multiprocess_mode="liveall")
        self.reloads = Counter("registry_reloads_total", "Version changes tried, by what triggered them and how they ended",
                               ["model", "trigger", "outcome"])
        self.load_seconds = Histogram("registry_model_load_seconds", "Time to fetch, verify, load and warm up a version", ["model"],
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.staleness = Gauge("registry_model_staleness_seconds",
                               "Age of the registry answer a model is served from while the registry cannot be asked (0 when fresh)",
                               ["model"], multiprocess_mode="livemax")
        self.circuit_open = Gauge("registry_circuit_open", "1 while a layer's circuit breaker is open", ["layer"],
                                  multiprocess_mode="livemax")
        self.gate_refusals = Counter("registry_gate_refusals_total", "Versions the promotion gate refused", ["model"])
        for name in ("resolutions", "model_info", "reloads", "load_seconds", "staleness", "gate_refusals"):
            setattr(self, name, _ModelLabelled(getattr(self, name)))
        self.cache_writes = Counter("registry_cache_writes_total", "Writes of registry data to the cache and the backup",
                                    ["target", "outcome"])


def metrics() -> RegistryMetrics:
    """The process's metrics, created on first use (inside the worker)."""
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            _METRICS = RegistryMetrics()
        return _METRICS


def observe_trail(model: str, trail: Iterable[Any]) -> None:
    """Count each layer's answer in a resolution trail, and how long the layers that were asked took."""
    m = metrics()
    for attempt in trail:
        m.resolutions.labels(model, attempt.source, str(attempt.outcome)).inc()
        if attempt.elapsed_ms > 0:
            m.layer_duration.labels(attempt.source).observe(attempt.elapsed_ms / 1000)


def serving_changed(model: str, old: Optional[Any], new: Optional[Any]) -> None:
    """`registry_model_info`: the new served version's series to 1, the old one's to 0."""
    m = metrics()
    if old is not None:
        m.model_info.labels(model, old.record.version, old.record.source, str(old.resolution.selector)).set(0)
    if new is not None:
        m.model_info.labels(model, new.record.version, new.record.source, str(new.resolution.selector)).set(1)


#: BentoML's own routes, besides a service's APIs and the admin app's.
BENTOML_ROUTES = ("/", "/readyz", "/livez", "/healthz", "/metrics", "/docs.json", "/schema.json")
_ENDPOINT_METRICS = ("metrics_request_duration", "metrics_request_total", "metrics_request_in_progress")


class _EndpointLabelled:
    """One of BentoML's request metrics, its `endpoint` label held to the routes the service has."""

    def __init__(self, metric: Any, known: frozenset[str]):
        self._metric = metric
        self._known = known

    def labels(self, *values: Any, **named: Any) -> Any:
        if "endpoint" in named and named["endpoint"] not in self._known:
            named["endpoint"] = OTHER
        return self._metric.labels(*values, **named)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


def bound_request_endpoints(routes: Iterable[str]) -> bool:
    """BentoML labels its `bentoml_service_request_*` series with the raw request path, so every made-up
    path a client sends would add series: held to `routes` (and BentoML's own), any other path is `other`.
    Returns whether BentoML's middleware was found (it is an internal of BentoML 1.4)."""
    try:
        from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as middleware
    except ImportError:
        return False
    setup = getattr(middleware, "_setup", None)
    if setup is None or getattr(setup, "_registry_bounded", False):
        return setup is not None
    extra = frozenset(routes)

    def bounded_setup(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = setup(self, *args, **kwargs)
        from bentoml._internal.context import server_context

        known = frozenset(BENTOML_ROUTES) | frozenset(server_context.service_routes) | extra
        for name in _ENDPOINT_METRICS:
            if hasattr(self, name):
                setattr(self, name, _EndpointLabelled(getattr(self, name), known))
        return result

    bounded_setup._registry_bounded = True  # type: ignore[attr-defined]
    middleware._setup = bounded_setup  # type: ignore[method-assign]  # the guarded patch described above
    return True
