"""Resolution per layer: the time to a record answered by each layer, beside the floor under it.

Each layer is timed alone (a `Resolver` holding only that layer, so nothing is written back), with a
tiny model published through the MLflow server, the Redis cache and the file backup. Floors: a bare
Redis GET of the same payload, an HTTP GET of the same bytes from a trivial stdlib server, the MLflow
server's own /health, and reading the backup file. "Repeated in-process" is the full chain asked for
the same record again in one process: an exact version (which the resolver's in-process memory may
answer) and `latest` (which must ask the registry each time).
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any, Callable

import httpx
import redis

from bench.lab import Lab
from bench.report import AreaReport, median, repeat, summarize
from registry.payload import RegistryPayload
from registry.record import Selector
from registry.resolver import Resolver
from registry.sources.file_backup import FileBackupSource
from registry.sources.mlflow_registry import MLflowRegistrySource
from registry.sources.redis_cache import RedisCacheSource
from registry.sources.training_api import TrainingAPISource
from tests.helpers import MisbehavingLayer, settings_for


def _ms(seconds: list[float]) -> float:
    value = median(seconds)
    assert value is not None
    return value * 1000


def peak_kib(fn: Callable[[], Any]) -> float:
    """Peak Python allocation of one call, in KiB."""
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1024


def run(lab: Lab, quick: bool) -> AreaReport:
    report = AreaReport("resolution", "time to a record, per registry layer, beside the floor under it")
    n_fast, n_slow = (50, 15) if quick else (200, 50)
    tiny = lab.tiny_registry()
    api = lab.training_api()
    name, selector = tiny.name, Selector.parse("latest")
    expected = max(tiny.records, key=int)

    redis_src = RedisCacheSource(tiny.redis_url, key=tiny.cache_key, ttl=3600, timeout=0.5)
    api_src = TrainingAPISource(api.url, timeout=3.0)
    mlflow_src = MLflowRegistrySource(tiny.mlflow_url, timeout=3.0, retries=1)
    file_src = FileBackupSource(tiny.backup_path)
    chain = Resolver.from_settings(settings_for(lab.run_dir, redis_url=tiny.redis_url, cache_key=tiny.cache_key,
                                                training_api_url=api.url, mlflow_uri=tiny.mlflow_url,
                                                backup_path=tiny.backup_path))
    bare = redis.Redis.from_url(tiny.redis_url)
    payload_bytes = bare.get(tiny.cache_key)
    assert payload_bytes, "the publisher did not fill the Redis cache"
    stdlib = MisbehavingLayer()
    handler = stdlib.server.RequestHandlerClass
    handler.protocol_version = "HTTP/1.1"  # keep-alive, like the pooled clients
    handler.disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    stdlib.body = payload_bytes
    http = httpx.Client(timeout=5.0)
    try:
        with stdlib.running():
            layers = {
                "redis": Resolver([redis_src]),
                "training_api": Resolver([api_src]),
                "mlflow": Resolver([mlflow_src]),
                "file": Resolver([file_src]),
            }
            for layer, resolver in layers.items():
                got = resolver.resolve(name, selector)
                assert got.record.version == expected and got.record.source == layer, (layer, got.record)
            assert chain.resolve(name, selector).trail[-1].source == "redis"
            exact = Selector.parse(expected)
            chain.resolve(name, exact)  # the first resolution of the exact version walks the chain
            exact_by = chain.resolve(name, exact).trail[-1].source  # who answers the repeats

            timings: dict[str, list[float]] = {}
            timings["exact_repeat"] = repeat(lambda: chain.resolve(name, exact), n_fast)
            timings["chain_repeat"] = repeat(lambda: chain.resolve(name, selector), n_fast)
            timings["redis"] = repeat(lambda: layers["redis"].resolve(name, selector), n_fast)
            timings["redis_get"] = repeat(lambda: bare.get(tiny.cache_key), n_fast)
            timings["parse_select"] = repeat(
                lambda: RegistryPayload.parse(payload_bytes, "bench").section(name, source="redis").select(selector, custom_aliases=False),  # type: ignore[union-attr]
                n_fast)
            timings["training_api"] = repeat(lambda: layers["training_api"].resolve(name, selector), n_fast)
            timings["http_rtt"] = repeat(lambda: http.get(stdlib.url + "/models/latest").content, n_fast)
            timings["mlflow"] = repeat(lambda: layers["mlflow"].resolve(name, selector), n_slow)
            timings["mlflow_health"] = repeat(lambda: http.get(tiny.mlflow_url + "/health").content, n_slow)
            timings["file"] = repeat(lambda: layers["file"].resolve(name, selector), n_fast)
            timings["file_read"] = repeat(lambda: tiny.backup_path.read_bytes(), n_fast)
            memory = {layer: round(peak_kib(lambda r=resolver: r.resolve(name, selector)), 1) for layer, resolver in layers.items()}
            memory["chain_repeat"] = round(peak_kib(lambda: chain.resolve(name, selector)), 1)
            memory["exact_repeat"] = round(peak_kib(lambda: chain.resolve(name, exact)), 1)
    finally:
        http.close()
        bare.close()
        chain.close()
        for src in (redis_src, api_src, mlflow_src, file_src):
            src.close()

    t = {k: _ms(v) for k, v in timings.items()}
    report.add("repeated in-process resolution, exact version", t["exact_repeat"], "ms", "bare Redis GET", t["redis_get"],
               key="exact_repeat", note=f"the same record asked again in one process: answered by {exact_by}")
    report.add("repeated in-process resolution, 'latest'", t["chain_repeat"], "ms", "bare Redis GET", t["redis_get"],
               key="chain_repeat", note="full chain: 'latest' may move, so every repeat asks the registry (answered by Redis)")
    report.add("Redis cache layer", t["redis"], "ms", "bare Redis GET", t["redis_get"], key="redis")
    report.add("  of which: parse + validate + select (no I/O)", t["parse_select"], "ms", "bare Redis GET", t["redis_get"],
               key="parse_select")
    report.add("training API layer", t["training_api"], "ms", "HTTP GET, stdlib server, same bytes", t["http_rtt"], key="training_api")
    report.add("MLflow layer (server, sqlite, 1 worker)", t["mlflow"], "ms", "MLflow server /health", t["mlflow_health"], key="mlflow")
    report.add("file backup layer", t["file"], "ms", "read the file", t["file_read"], key="file")
    report.add("Redis layer (seed target: cache hit < 1 ms)", t["redis"], "ms", "seed target", 1.0, key="redis_seed")
    report.add("MLflow layer (seed target: 100-500 ms)", t["mlflow"], "ms", "seed target (low end)", 100.0, key="mlflow_seed")
    report.add("file layer (seed target: 10-50 ms)", t["file"], "ms", "seed target (low end)", 10.0, key="file_seed")
    report.notes.append(f"payload {len(payload_bytes)} bytes, {len(tiny.records)} versions of one model; "
                        f"repeats: {n_fast} per fast layer, {n_slow} for MLflow; medians shown")
    report.notes.append("peak Python allocation per resolution (tracemalloc): "
                        + ", ".join(f"{k} {v} KiB" for k, v in memory.items()))
    report.detail = {"timings": {k: summarize(v) for k, v in timings.items()}, "peak_kib": memory,
                     "payload_bytes": len(payload_bytes), "repeats": {"fast": n_fast, "mlflow": n_slow},
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return report
