"""Scale: resolution time and memory as the registry grows, and classify throughput with 1 and 2 workers.

Registry sizes of 1, 10 and 100 registered models x 20 versions, under the prefix `scale_` on the
run's MLflow server. Publishing 2000 real versions would take hours, so versions are registered
directly (`create_model_version`) against one real artifact (the tiny model), carrying the tags the
publisher sets; resolution reads only registry data, so it cannot tell the difference. The payload
the cache and backup layers hold is built from MLflow the way the training API builds it.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.demo_model import text_mix
from bench.hotpath import service_levels
from bench.lab import Lab, rss_mib
from bench.report import AreaReport, median, repeat, summarize
from bench.resolution import peak_kib
from registry.record import BEST, Selector
from registry.resolver import Resolver
from registry.signing import PayloadCodec
from registry.sources.file_backup import FileBackupSource
from registry.sources.mlflow_registry import (
    TAG_ARTIFACT_URI,
    TAG_METRICS,
    TAG_SHA256,
    MLflowRegistrySource,
)
from registry.sources.redis_cache import RedisCacheSource

PREFIX = "scale_"
VERSIONS = 20


def grow_registry(client: Any, have: int, want: int, base: Any, tags: dict[str, str]) -> None:
    """Register models `scale_m<have>` .. `scale_m<want-1>`, each with VERSIONS versions and `best` on one."""

    # The REST answer leaves `model_id` empty; the source `models:/m-<id>` names the logged model.
    model_id = base.model_id or base.source.removeprefix("models:/")

    def one(i: int) -> None:
        name = f"{PREFIX}m{i:03d}"
        client.create_registered_model(name)
        for v in range(1, VERSIONS + 1):
            metrics = json.dumps({"f1": round(0.5 + v / 100, 3), "accuracy": round(0.5 + v / 100, 3)}, sort_keys=True)
            client.create_model_version(name, base.source, run_id=base.run_id, model_id=model_id,
                                        tags={**tags, TAG_METRICS: metrics}, await_creation_for=0)
        client.set_registered_model_alias(name, BEST, str(VERSIONS - 1))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, range(have, want)))


def run(lab: Lab, quick: bool) -> AreaReport:
    report = AreaReport("scale", "resolution vs registry size; throughput vs workers")
    levels = (1, 10) if quick else (1, 10, 100)
    n_fast, n_slow = (30, 10) if quick else (100, 30)
    duration, warmup = (4.0, 1.0) if quick else (15.0, 3.0)

    tiny = lab.tiny_registry()
    mlflow_src = MLflowRegistrySource(tiny.mlflow_url, prefix=PREFIX, timeout=10.0, retries=1)
    client = mlflow_src.client
    base = client.get_model_version(f"security_{tiny.name}", "1")
    tags = {k: v for k, v in (base.tags or {}).items() if k in (TAG_SHA256, TAG_ARTIFACT_URI)}

    per_level: dict[int, dict[str, Any]] = {}
    have = 0
    try:
        for n in levels:
            started = time.perf_counter()
            grow_registry(client, have, n, base, tags)
            have = n
            grow_s = time.perf_counter() - started
            t = time.perf_counter()
            payload = mlflow_src.payload()
            payload_s = time.perf_counter() - t
            key = f"bench:scale:{n}"
            redis_src = RedisCacheSource(lab.redis_url, key=key, ttl=3600, timeout=2.0)
            redis_src.store_payload(payload)
            file_src = FileBackupSource(lab.run_dir / f"scale-{n}.json")
            file_src.store_payload(payload)
            layers = {"redis": Resolver([redis_src]), "mlflow": Resolver([mlflow_src]), "file": Resolver([file_src])}
            selector = Selector.parse("latest")
            target = f"m{n // 2:03d}"  # a model in the middle of the payload
            timings, memory = {}, {}
            for layer, resolver in layers.items():
                got = resolver.resolve(target, selector)
                assert got.record.version == str(VERSIONS) and got.record.source == layer, got.record
                timings[layer] = repeat(lambda r=resolver, t=target, s=selector: r.resolve(t, s), n_slow if layer == "mlflow" else n_fast)
                memory[layer] = round(peak_kib(lambda r=resolver, t=target, s=selector: r.resolve(t, s)), 1)
            redis_src.close()
            per_level[n] = {
                "models": n, "versions": n * VERSIONS, "payload_bytes": len(PayloadCodec().encode(payload)),
                "register_s": round(grow_s, 1), "payload_from_mlflow_s": round(payload_s, 3),
                "timings": {k: summarize(v) for k, v in timings.items()}, "median_ms": {k: median(v) * 1000 for k, v in timings.items()},
                "peak_kib": memory,
            }
    finally:
        mlflow_src.close()

    first = per_level[levels[0]]
    for n in levels[1:] if len(levels) > 1 else levels:
        row = per_level[n]
        for layer in ("redis", "mlflow", "file"):
            report.add(f"{layer} resolution, {n} models x {VERSIONS}", row["median_ms"][layer], "ms",
                       f"{levels[0]} model x {VERSIONS}", first["median_ms"][layer], key=f"{layer}_{n}")
        for layer in ("redis", "mlflow", "file"):
            report.add(f"{layer} peak memory per resolution, {n} models", row["peak_kib"][layer], "KiB",
                       f"{levels[0]} model", first["peak_kib"][layer], key=f"{layer}_mem_{n}")
    for n in levels:
        row = per_level[n]
        report.notes.append(f"{n} models x {VERSIONS}: payload {row['payload_bytes'] / 1024:.0f} KiB, built from MLflow in "
                            f"{row['payload_from_mlflow_s'] * 1000:.0f} ms; registered in {row['register_s']} s; medians "
                            + ", ".join(f"{k} {v:.2f} ms" for k, v in row["median_ms"].items()))

    texts = text_mix()
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
    demo = lab.demo()
    workers: dict[int, Any] = {}
    for w in (1, 2):
        svc, ready_s = lab.service(workers=w)
        try:
            results, mean_batch = service_levels(svc, demo.name, bodies, duration, warmup, levels=(32,))
            # With 2 workers, /models answers from either worker: the batch counters do not add up.
            workers[w] = {"load": results[32], "mean_batch": mean_batch[32] if w == 1 else None,
                          "rss_mib": rss_mib(svc.proc.pid) if svc.proc else None,
                          "ready_s": ready_s}
        finally:
            svc.stop()
    one, two = workers[1], workers[2]
    report.add("throughput, 2 workers, 32 clients", two["load"].rps, "req/s", "1 worker", one["load"].rps, key="workers_rps")
    report.add("p99, 2 workers, 32 clients", two["load"].p99_ms, "ms", "1 worker", one["load"].p99_ms, key="workers_p99")
    report.add("non-200 + errors, 2 workers", float(two["load"].non_200 + two["load"].errors), "count", "1 worker",
               float(one["load"].non_200 + one["load"].errors), key="workers_bad")
    report.add("service RSS, 2 workers", two["rss_mib"], "MiB", "1 worker", one["rss_mib"], key="workers_rss")
    report.notes.append(f"workers: mean batch with 1 worker {one['mean_batch']}; ready in {one['ready_s']:.1f} s (1 worker) / "
                        f"{two['ready_s']:.1f} s (2 workers); {duration:.0f} s measured after {warmup:.0f} s warm-up")
    report.detail = {
        "levels": {str(n): v for n, v in per_level.items()},
        "workers": {str(w): {**v, "load": v["load"].to_dict()} for w, v in workers.items()},
        "durations": {"measured_s": duration, "warmup_s": warmup},
        "repeats": {"fast": n_fast, "mlflow": n_slow},
    }
    return report
