"""The hot path: classify throughput and latency at 1, 8 and 32 clients, beside the model's own speed.

Three subjects serve the same registered demo model (version 1):
- the raw model in this process: `TextClassificationRunner.predict` (tokenize + forward + softmax)
  over batches of the text mix, best of a few batch sizes, torch threads = 2: the ceiling;
- the service, `bentoml serve` with its defaults (one worker, `REGISTRY_TORCH_THREADS` default);
- `mlflow models serve --env-manager local` of `models:/security_prompt_injection/1`, its defaults.
Each request classifies one text of the mix, so requests/s and texts/s are the same number.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import httpx

from bench.demo_model import text_mix
from bench.lab import Lab, get_json, rss_mib
from bench.load import LoadResult, run_load
from bench.report import AreaReport

LEVELS = (1, 8, 32)
RAW_BATCHES = (1, 8, 16, 32)


def raw_ceiling(lab: Lab, texts: list[str], seconds: float, threads_list: tuple[int, ...] = (2, 1)) -> dict[str, Any]:
    """texts/s of the runner in this process for each torch thread count and batch size."""
    import torch

    from runners.runner import TextClassificationRunner

    demo = lab.demo()
    runner = TextClassificationRunner(demo.records["1"], demo.settings(), device="cpu")
    runner.load()
    previous = torch.get_num_threads()
    results: dict[str, Any] = {}
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for batch in RAW_BATCHES:
                runner.predict(texts[:batch])  # warm this shape
                done, i, batch_times = 0, 0, []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds:
                    chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
                    i += batch
                    t0 = time.perf_counter()
                    runner.predict(chunk)
                    batch_times.append(time.perf_counter() - t0)
                    done += batch
                elapsed = time.perf_counter() - start
                results[f"threads={threads},batch={batch}"] = {
                    "threads": threads, "batch": batch, "texts_per_s": done / elapsed,
                    "batch_ms_median": sorted(batch_times)[len(batch_times) // 2] * 1000, "batches": len(batch_times),
                }
        # What length-bucketed batching could reach: the same texts, batches of similar length (sorted mix).
        torch.set_num_threads(threads_list[0])
        ordered = sorted(texts, key=len)
        for batch in RAW_BATCHES[1:]:
            done, i = 0, 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                lo = (i * batch) % len(ordered)
                runner.predict(ordered[lo:lo + batch])
                done += len(ordered[lo:lo + batch])
                i += 1
            results[f"threads={threads_list[0]},batch={batch},sorted"] = {
                "threads": threads_list[0], "batch": batch, "sorted": True, "texts_per_s": done / (time.perf_counter() - start)}
        labels = [p["label"] for p in runner.predict(texts)]
    finally:
        torch.set_num_threads(previous)
        runner.close()
    return {"runs": results, "labels": labels}


def best(runs: dict[str, Any], threads: int, sorted_: bool = False) -> dict[str, Any]:
    return max((r for r in runs.values() if r["threads"] == threads and r.get("sorted", False) == sorted_),
               key=lambda r: r["texts_per_s"])


def load_levels(url: str, path: str, bodies: list[bytes], duration: float, warmup: float,
                levels: tuple[int, ...] = LEVELS) -> dict[int, LoadResult]:
    return {c: run_load(url, path, bodies, c, duration, warmup) for c in levels}


def batch_counters(client: httpx.Client, name: str) -> tuple[int, int]:
    model = get_json(client, "/models")["models"][name]
    return int(model.get("batches", 0)), int(model.get("texts", 0))


def service_levels(svc: Any, name: str, bodies: list[bytes], duration: float, warmup: float,
                   levels: tuple[int, ...] = LEVELS) -> tuple[dict[int, LoadResult], dict[int, Optional[float]]]:
    """Load levels against the service, with the mean batch the micro-batcher formed at each level."""
    results, mean_batch = {}, {}
    for c in levels:
        b0, t0 = batch_counters(svc.client, name)
        results[c] = run_load(svc.url, "/classify", bodies, c, duration, warmup)
        b1, t1 = batch_counters(svc.client, name)
        mean_batch[c] = round((t1 - t0) / (b1 - b0), 2) if b1 > b0 else None
    return results, mean_batch


def run(lab: Lab, quick: bool) -> AreaReport:
    report = AreaReport("hotpath", "classify throughput and latency, demo MiniLM, one text per request")
    duration, warmup, raw_s = (4.0, 1.0, 1.5) if quick else (15.0, 3.0, 5.0)
    demo = lab.demo()
    texts = text_mix()

    raw = raw_ceiling(lab, texts, raw_s)
    ceiling, ceiling_1t, bucketed = best(raw["runs"], 2), best(raw["runs"], 1), best(raw["runs"], 2, sorted_=True)

    svc, ready_s = lab.service()
    try:
        answer = svc.classify(texts).json()
        service_labels = [p["label"] for p in answer["predictions"]]
        served_version = answer["model"]["version"]
        service_bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
        service, mean_batch = service_levels(svc, demo.name, service_bodies, duration, warmup)
        service_rss = rss_mib(svc.proc.pid) if svc.proc else None
    finally:
        svc.stop()

    started = time.perf_counter()
    mls = lab.mlflow_models_serve()
    mls_start_s = time.perf_counter() - started
    try:
        first = httpx.post(mls.url + "/invocations", json={"inputs": texts}, timeout=120)
        first.raise_for_status()
        mlflow_labels = [p["label"] for p in first.json()["predictions"]]
        mlflow_bodies = [json.dumps({"inputs": [t]}).encode() for t in texts]
        mlflow = load_levels(mls.url, "/invocations", mlflow_bodies, duration, warmup)
        mlflow_rss = rss_mib(mls.proc.pid) if mls.proc else None
    finally:
        mls.stop()

    report.add("raw model, best batch, 2 threads", ceiling["texts_per_s"], "texts/s", note=f"batch {ceiling['batch']}", key="raw_ceiling")
    report.add("raw model, best batch, 1 thread", ceiling_1t["texts_per_s"], "texts/s", "raw, 2 threads", ceiling["texts_per_s"],
               note=f"batch {ceiling_1t['batch']}", key="raw_1thread")
    report.add("raw model, length-sorted batches, 2 threads", bucketed["texts_per_s"], "texts/s", "raw, 2 threads", ceiling["texts_per_s"],
               note=f"batch {bucketed['batch']}; the mix sorted by length, so a batch pads little (what bucketing could reach)",
               key="raw_sorted")
    for c in LEVELS:
        s, m = service[c], mlflow[c]
        report.add(f"service throughput, {c} clients, vs ceiling", s.rps, "req/s", "raw ceiling", ceiling["texts_per_s"], key=f"svc_rps_vs_raw_{c}",
                   note=f"mean batch {mean_batch[c]}")
        report.add(f"service throughput, {c} clients, vs mlflow", s.rps, "req/s", "mlflow models serve", m.rps, key=f"svc_rps_vs_mlflow_{c}")
        report.add(f"service p50, {c} clients", s.p50_ms, "ms", "mlflow models serve p50", m.p50_ms, key=f"svc_p50_{c}")
        report.add(f"service p99, {c} clients", s.p99_ms, "ms", "mlflow models serve p99", m.p99_ms, key=f"svc_p99_{c}")
        report.add(f"service non-200 + errors, {c} clients", float(s.non_200 + s.errors), "count", "mlflow models serve",
                   float(m.non_200 + m.errors), key=f"svc_bad_{c}")
    report.add("service RSS after load", service_rss, "MiB", "mlflow models serve RSS", mlflow_rss, key="rss")
    agree = sum(a == b for a, b in zip(service_labels, raw["labels"]))
    agree_m = sum(a == b for a, b in zip(mlflow_labels, raw["labels"]))
    report.notes.append(f"labels agree with the raw model on {agree}/{len(texts)} texts (service, version {served_version}), "
                        f"{agree_m}/{len(texts)} (mlflow models serve)")
    report.notes.append(f"each level: {warmup:.0f} s warm-up, then {duration:.0f} s measured; text mix of {len(texts)} texts, "
                        f"{min(map(len, texts))}-{max(map(len, texts))} characters")
    report.notes.append(f"service ready in {ready_s:.1f} s; mlflow models serve up in {mls_start_s:.1f} s")
    report.detail = {
        "raw": raw["runs"],
        "service": {c: r.to_dict() for c, r in service.items()},
        "service_mean_batch": mean_batch,
        "mlflow_models_serve": {c: r.to_dict() for c, r in mlflow.items()},
        "service_ready_s": round(ready_s, 2),
        "mlflow_models_serve_start_s": round(mls_start_s, 2),
        "demo_model": {"registered": demo.registered_name, "meta": demo.meta},
        "durations": {"measured_s": duration, "warmup_s": warmup, "raw_per_config_s": raw_s},
    }
    return report
