"""The hot path: classify throughput and latency at 1, 8 and 32 clients, beside the model's own speed.

Three subjects serve the same registered demo model (version 1):
- the raw model in this process: the artifact loaded with plain transformers, tokenize + forward
  over batches of the text mix; the ceiling is the best of batch sizes 1-32 and torch threads 1 and 2
  (2 threads is the machine's width; taking the best of both can only raise the ceiling);
- the service, `bentoml serve` with its defaults (one worker, `REGISTRY_TORCH_THREADS` default);
- `mlflow models serve --env-manager local` of `models:/security_prompt_injection/1`, its defaults.
Each request classifies one text of the mix, so requests/s and texts/s are the same number.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import httpx

from bench.demo_model import text_mix
from bench.lab import Lab, get_json, rss_mib
from bench.load import LoadResult, run_load
from bench.report import AreaReport

LEVELS = (1, 8, 32)
RAW_BATCHES = (1, 8, 16, 32)
RAW_THREADS = (1, 2)


class RawModel:
    """The registered artifact as plain transformers objects: tokenize + forward, nothing of the runner."""

    def __init__(self, lab: Lab):
        import yaml
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from runners.artifacts import ArtifactStore

        demo = lab.demo()
        path = Path(ArtifactStore(demo.settings()).fetch(demo.records["1"]))  # the warm artifact cache
        flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["transformers"]
        self.tokenizer = AutoTokenizer.from_pretrained(path / "components" / "tokenizer")
        self.model = AutoModelForSequenceClassification.from_pretrained(path / str(flavor.get("model_binary", "model"))).eval()
        self.max_length = min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)
        self.labels = self.model.config.id2label

    def predict(self, texts: list[str]) -> list[str]:
        import torch

        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            indices = self.model(**encoded).logits.softmax(dim=-1).argmax(dim=-1)
        return [self.labels[i] for i in indices.tolist()]


def raw_ceiling(lab: Lab, texts: list[str], seconds: float, trials: int) -> dict[str, Any]:
    """texts/s of the plain model in this process per torch thread count and batch size, best of `trials`.

    The raw model is the artifact loaded with transformers directly, so the ceiling does not move
    with the runner's own batching code. Each configuration runs `trials` times for `seconds`,
    interleaved with the others, and keeps its best trial: a ceiling is what the machine can do, and
    other work on a shared machine only ever lowers a trial. Batches take the mix in order (mixed
    lengths, padded to the longest), and also sorted by length (little padding: what
    length-grouped batching can reach).
    """
    import torch

    raw = RawModel(lab)
    previous = torch.get_num_threads()
    ordered = sorted(texts, key=len)
    configs = [(t, b, False) for t in RAW_THREADS for b in RAW_BATCHES] + [(t, b, True) for t in RAW_THREADS for b in RAW_BATCHES[1:]]
    results: dict[str, Any] = {}
    try:
        for _ in range(trials):
            for threads, batch, by_length in configs:
                torch.set_num_threads(threads)
                source = ordered if by_length else texts
                raw.predict(source[:batch])  # warm this shape
                done, i, batch_times = 0, 0, []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds:
                    lo = (i * batch) % len(source)
                    chunk = (source + source)[lo:lo + batch]
                    i += 1
                    t0 = time.perf_counter()
                    raw.predict(chunk)
                    batch_times.append(time.perf_counter() - t0)
                    done += len(chunk)
                rate = done / (time.perf_counter() - start)
                key = f"threads={threads},batch={batch}" + (",sorted" if by_length else "")
                row = results.setdefault(key, {"threads": threads, "batch": batch, "sorted": by_length, "trials": []})
                row["trials"].append(round(rate, 2))
                if rate >= row.get("texts_per_s", 0):
                    row.update(texts_per_s=rate, batch_ms_median=sorted(batch_times)[len(batch_times) // 2] * 1000)
        torch.set_num_threads(max(RAW_THREADS))
        labels = raw.predict(texts)
    finally:
        torch.set_num_threads(previous)
    return {"runs": results, "labels": labels}


def best(runs: dict[str, Any], threads: Optional[int] = None, by_length: bool = False) -> dict[str, Any]:
    return max((r for r in runs.values() if (threads is None or r["threads"] == threads) and r["sorted"] == by_length),
               key=lambda r: r["texts_per_s"])


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
    duration, warmup, raw_s, trials = (4.0, 1.0, 1.0, 1) if quick else (15.0, 3.0, 2.5, 2)
    demo = lab.demo()
    texts = text_mix()

    raw = raw_ceiling(lab, texts, raw_s, trials)
    ceiling, raw_2t, raw_1t, bucketed = best(raw["runs"]), best(raw["runs"], 2), best(raw["runs"], 1), best(raw["runs"], by_length=True)

    # Both servers up at once, levels interleaved (service, then mlflow, per level): drift in the
    # other work on a shared machine then falls on both alike. An idle server costs little CPU.
    svc, ready_s = lab.service()
    started = time.perf_counter()
    mls = lab.mlflow_models_serve()
    mls_start_s = time.perf_counter() - started
    service: dict[int, LoadResult] = {}
    mlflow: dict[int, LoadResult] = {}
    mean_batch: dict[int, Optional[float]] = {}
    loadavg: dict[str, float] = {}
    try:
        answer = svc.classify(texts).json()
        service_labels = [p["label"] for p in answer["predictions"]]
        served_version = answer["model"]["version"]
        first = httpx.post(mls.url + "/invocations", json={"inputs": texts}, timeout=120)
        first.raise_for_status()
        mlflow_labels = [p["label"] for p in first.json()["predictions"]]
        service_bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
        mlflow_bodies = [json.dumps({"inputs": [t]}).encode() for t in texts]
        for c in LEVELS:
            loadavg[f"service_{c}"] = os.getloadavg()[0]
            levels, batches = service_levels(svc, demo.name, service_bodies, duration, warmup, levels=(c,))
            service[c], mean_batch[c] = levels[c], batches[c]
            loadavg[f"mlflow_{c}"] = os.getloadavg()[0]
            mlflow[c] = run_load(mls.url, "/invocations", mlflow_bodies, c, duration, warmup)
        service_rss = rss_mib(svc.proc.pid) if svc.proc else None
        mlflow_rss = rss_mib(mls.proc.pid) if mls.proc else None
    finally:
        svc.stop()
        mls.stop()

    report.add("raw model ceiling: best of threads x batch", ceiling["texts_per_s"], "texts/s", key="raw_ceiling",
               note=f"{ceiling['threads']} thread(s), batch {ceiling['batch']}")
    report.add("raw model, 2 threads, best batch", raw_2t["texts_per_s"], "texts/s", "raw ceiling", ceiling["texts_per_s"],
               note=f"batch {raw_2t['batch']}", key="raw_2threads")
    report.add("raw model, 1 thread, best batch", raw_1t["texts_per_s"], "texts/s", "raw ceiling", ceiling["texts_per_s"],
               note=f"batch {raw_1t['batch']}", key="raw_1thread")
    report.add("raw model, length-sorted batches", bucketed["texts_per_s"], "texts/s", "raw ceiling", ceiling["texts_per_s"],
               note=f"{bucketed['threads']} thread(s), batch {bucketed['batch']}; the mix sorted by length, so a batch pads little "
                    "(what length-grouped batching can reach; not part of the ceiling)", key="raw_sorted")
    for c in LEVELS:
        s, m = service[c], mlflow[c]
        report.add(f"service throughput, {c} clients, vs ceiling", s.rps, "req/s", "raw ceiling", ceiling["texts_per_s"],
                   key=f"svc_rps_vs_raw_{c}", note=f"mean batch formed by the service: {mean_batch[c]}")
        report.add(f"service throughput, {c} clients, vs mlflow", s.rps, "req/s", "mlflow models serve", m.rps, key=f"svc_rps_vs_mlflow_{c}")
        report.add(f"service p50, {c} clients", s.p50_ms, "ms", "mlflow models serve p50", m.p50_ms, key=f"svc_p50_{c}")
        report.add(f"service p99, {c} clients", s.p99_ms, "ms", "mlflow models serve p99", m.p99_ms, key=f"svc_p99_{c}")
        report.add(f"service non-200 + errors, {c} clients", float(s.bad), "count", "mlflow models serve", float(m.bad), key=f"svc_bad_{c}")
    report.add("service RSS after load", service_rss, "MiB", "mlflow models serve RSS", mlflow_rss, key="rss")
    agree = sum(a == b for a, b in zip(service_labels, raw["labels"], strict=True))
    agree_m = sum(a == b for a, b in zip(mlflow_labels, raw["labels"], strict=True))
    report.notes.append(f"labels agree with the raw model on {agree}/{len(texts)} texts (service, version {served_version}), "
                        f"{agree_m}/{len(texts)} (mlflow models serve)")
    report.notes.append(f"each level: {warmup:.0f} s warm-up, then {duration:.0f} s measured"
                        f"{' (throughput per third of the window in the JSON file)' if duration >= 9 else ''}; service and mlflow interleaved per level; "
                        f"text mix of {len(texts)} texts, {min(map(len, texts))}-{max(map(len, texts))} characters; "
                        f"raw: best of {trials} x {raw_s:.1f} s per configuration")
    report.notes.append("load generator CPU (s per s, same process for both): "
                        + ", ".join(f"{c} clients {service[c].client_cpu} / {mlflow[c].client_cpu}" for c in LEVELS))
    report.notes.append(f"1-minute load average at each level start: {', '.join(f'{k} {v:.1f}' for k, v in loadavg.items())}")
    report.notes.append(f"service ready in {ready_s:.1f} s; mlflow models serve up in {mls_start_s:.1f} s")
    report.detail = {
        "raw": raw["runs"],
        "service": {c: r.to_dict() for c, r in service.items()},
        "service_mean_batch": mean_batch,
        "mlflow_models_serve": {c: r.to_dict() for c, r in mlflow.items()},
        "loadavg_at_level_start": loadavg,
        "service_ready_s": round(ready_s, 2),
        "mlflow_models_serve_start_s": round(mls_start_s, 2),
        "demo_model": {"registered": demo.registered_name, "meta": demo.meta},
        "durations": {"measured_s": duration, "warmup_s": warmup, "raw_per_config_s": raw_s, "raw_trials": trials},
    }
    return report
