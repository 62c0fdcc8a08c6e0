"""The hot path: classify throughput and latency at 1, 8 and 32 clients, beside the model's own speed.

Subjects serving the same registered demo model (version 1):
- the raw model in this process: the artifact loaded with plain transformers, tokenize + forward
  over batches of the text mix, every text read in the service's windows (the same work as the
  service: none truncated). The honest ceiling is the best of every batching the service could
  use: batches of 1-32 in mix order, the whole mix sorted by length in batches of 8-32, and the
  service's own scheme (windows of 32 texts split into length groups of at most 8), each at torch
  threads 1 and 2 (2 threads is the machine's width; taking the best can only raise the ceiling),
  and the service's scheme on two forward lanes (two Python threads of one torch thread each),
  counting only those holding at most 32 texts at once (what 32 clients can send; 2 lanes of 32
  are measured and listed beside it). The headline ratio divides by the ceiling's two best
  configurations measured again right before and right after the service's level at 32 clients
  (a shared host's speed drifts by more than the 10% the target allows over a run); the ratio to
  the best trial of the whole run, before the servers started included, is reported beside it;
- the service, `bentoml serve` with its defaults (one worker; forward and torch threads `auto`: on
  2 cores, two forward lanes of one torch thread), the same with each `REGISTRY_ACCELERATE` value
  (int8, onnx, onnx-int8, openvino, openvino-int8, openvino-bf16; parity on the demo's gate set), with
  `REGISTRY_WORKERS=2`, and with one lane of one torch thread (the default before lanes);
- peers, each in every configuration and compared at its best: `mlflow models serve --env-manager
  local` of `models:/security_prompt_injection/1`, its defaults; a plain BentoML
  `@bentoml.api(batchable=True)` service (bench/peer_bentoml.py) at 1 and 2 torch threads; MLServer
  1.7 with its Hugging Face runtime and adaptive batching (bench/peers.py, its own venv, built when
  missing) at 1 and 2 intra-op threads x parallel_workers 0, 1 and 2.
Each request classifies one text of the mix, so requests/s and texts/s are the same number. All
servers are up together and the load levels interleave them (per level, each subject in turn).
At the end, one profiled run (py-spy, 32 clients) says where the service's CPU time goes, and one
run without a profiler attached how many cores its event loop and its other threads use, and how
idle the machine stays (the closed loop's gaps).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from bench.demo_model import text_mix
from bench.lab import Lab, get_json, rss_mib
from bench.load import LoadResult, run_load
from bench.report import AreaReport
from registry.settings import ACCELERATIONS, RegistrySettings

LEVELS = (1, 8, 32)
#: Seconds a service may take to be ready (an acceleration converts once, then checks parity on the gate set).
READY_TIMEOUT = 600.0
#: Every REGISTRY_ACCELERATE value, each a service of its own.
ACCELERATED = ACCELERATIONS
#: The demo's gate set (held-out texts): the services' accelerations check parity on it.
GATE_PATH = Path(__file__).resolve().parent.parent / "training" / "data" / "gate_prompt_injection.jsonl"
RAW_BATCHES = (1, 8, 16, 32)
RAW_THREADS = (1, 2)
#: Python threads running forward passes at once over one model, as the service's forward lanes do on 2 cores.
RAW_LANES = 2
#: (torch threads, batch or window, batching mode, lanes)
Config = tuple[int, int, str, int]
#: The service's batching, its defaults: the batcher gathers up to this many texts, the runner splits them into length groups.
SERVICE_WINDOW = RegistrySettings.model_fields["batch_max_texts"].default
SERVICE_GROUP = RegistrySettings.model_fields["forward_batch_size"].default


class RawModel:
    """The registered artifact as plain transformers objects: tokenize + forward, none of the serving code.

    It reads each text as the service does by default, with the runner's own helpers (the windows of
    runners/windows.py, `length_groups`, `pad_rows`): every token, a text longer than the model's
    window in overlapping windows, the text's answer that of its window most likely positive. A raw
    model that truncated would do less work than the service for the same texts (measured in process
    on the mix, the service's runner on 2 lanes: 174 texts/s truncating against 158 reading windows).
    """

    def __init__(self, lab: Lab):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from bench.peers import artifact_dirs
        from runners.text import _max_length
        from runners.windows import reading_for

        model_dir, tokenizer_dir = artifact_dirs(lab)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.max_length = _max_length(self.tokenizer)
        self.labels = self.model.config.id2label
        self.reading = reading_for(lab.demo().settings(), self.tokenizer, self.max_length,
                                   [self.labels[i] for i in range(len(self.labels))])

    def inputs(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """The model inputs the service reads for `texts` (token ids, special tokens included), and the text of each."""
        inputs: list[list[int]] = []
        owners: list[int] = []
        for i, ids in enumerate(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
            pieces, _ = self.reading.cut(i, ids, None)
            inputs += [self.reading.model_input(piece) for piece in pieces]
            owners += [i] * len(pieces)
        return inputs, owners

    def _forward(self, rows: list[list[int]]) -> Any:
        """Logits of model inputs (token ids, special tokens included), padded to the longest, as the service pads."""
        import torch

        from runners.text import pad_rows

        with torch.inference_mode():
            return self.model(**pad_rows(self.tokenizer, rows)).logits

    def _classify(self, texts: list[str], group: Optional[int]) -> list[str]:
        """Labels of `texts` from their windows, run in length groups of at most `group` (None: one pass over all);
        per text, the label of its window most likely positive, the first of equals (the service's rule)."""
        from runners.text import length_groups

        inputs, owners = self.inputs(texts)
        groups = length_groups([len(ids) for ids in inputs], group) if group else [list(range(len(inputs)))]
        probs: list[list[float]] = [[] for _ in inputs]
        for idx in groups:
            for i, row in zip(idx, self._forward([inputs[i] for i in idx]).softmax(dim=-1).tolist()):
                probs[i] = row
        positive = [sum(row[k] for k in self.reading.positive) for row in probs]
        winner: dict[int, int] = {}
        for i, owner in enumerate(owners):
            if owner not in winner or positive[i] > positive[winner[owner]]:
                winner[owner] = i
        return [self.labels[max(range(len(probs[w])), key=probs[w].__getitem__)] for w in (winner[t] for t in range(len(texts)))]

    def predict(self, texts: list[str]) -> list[str]:
        """One forward pass over every window of `texts`, padded to the longest."""
        return self._classify(texts, None)

    def predict_grouped(self, texts: list[str], group: int = SERVICE_GROUP) -> list[str]:
        """The service's scheme with nothing around it: the windows of `texts` in length groups of at most `group`, padded per group."""
        return self._classify(texts, group)

    def predict_inputs(self, inputs: list[list[int]]) -> list[int]:
        """Forward over model inputs already cut (token ids, special tokens included), padded to the longest: class indices."""
        return self._forward(inputs).argmax(dim=-1).tolist()


def on_lanes(lane: Callable[[int], None], lanes: int) -> None:
    """`lane(k)` for k in 0..lanes-1 at once: lane 0 in this thread, the others in threads of their own; returns when all have."""
    import threading

    workers = [threading.Thread(target=lane, args=(k,)) for k in range(1, lanes)]
    for worker in workers:
        worker.start()
    lane(0)
    for worker in workers:
        worker.join()


def raw_ceiling(raw: RawModel, texts: list[str], seconds: float, trials: int, configs: Optional[list[Config]] = None,
                results: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """texts/s of the plain model in this process per torch threads, batching and lanes, best of `trials`.

    The raw model is the artifact loaded with transformers directly, so the ceiling does not move
    with the batcher or the runner's code around the model. Each configuration runs `trials` times for `seconds`,
    interleaved with the others, and keeps its best trial: a ceiling is what the machine can do, and
    other work on a shared machine only ever lowers a trial. Batches take the mix in order (mixed
    lengths, padded to the longest), sorted by length (little padding), and as the service groups
    them (windows in mix order, length groups of at most 8), on one thread or, like the service's
    forward lanes, on several Python threads at once over one copy of the model. The ceiling is the
    best of those holding at most `IN_FLIGHT` texts at once (`best`). `configs` and `results` let a
    later call add trials to the same table.
    """
    import torch

    previous = torch.get_num_threads()
    ordered = sorted(texts, key=len)
    configs = configs or ([(t, b, "mixed", 1) for t in RAW_THREADS for b in RAW_BATCHES]
                          + [(t, b, "sorted", 1) for t in RAW_THREADS for b in RAW_BATCHES[1:]]
                          + [(t, SERVICE_WINDOW, "grouped", 1) for t in RAW_THREADS]
                          + [(1, w, "grouped", RAW_LANES) for w in (SERVICE_WINDOW // RAW_LANES, SERVICE_WINDOW)])
    results = {} if results is None else results
    try:
        for _ in range(trials):
            for threads, batch, mode, lanes in configs:
                torch.set_num_threads(threads)
                source = ordered if mode == "sorted" else texts
                run_batch = raw.predict_grouped if mode == "grouped" else raw.predict
                run_batch(source[:batch])  # warm this shape
                done, batch_times = [0] * lanes, []
                start = time.perf_counter()

                # The lanes run (and are joined) within this iteration: binding its variables as defaults says so.
                def lane(k: int, start: float = start, batch: int = batch, source: list[str] = source, run_batch: Any = run_batch,
                         batch_times: list[float] = batch_times, done: list[int] = done) -> None:
                    i = k * 7  # lanes start at different places in the mix
                    while time.perf_counter() - start < seconds:
                        lo = (i * batch) % len(source)
                        chunk = (source + source)[lo:lo + batch]
                        i += 1
                        t0 = time.perf_counter()
                        run_batch(chunk)
                        batch_times.append(time.perf_counter() - t0)
                        done[k] += len(chunk)

                on_lanes(lane, lanes)
                rate = sum(done) / (time.perf_counter() - start)
                key = (f"threads={threads},batch={batch}" + ("" if mode == "mixed" else f",{mode}")
                       + ("" if lanes == 1 else f",lanes={lanes}"))
                row = results.setdefault(key, {"threads": threads, "batch": batch, "mode": mode, "lanes": lanes,
                                               "sorted": mode == "sorted", "trials": []})
                row["trials"].append(round(rate, 2))
                if rate >= row.get("texts_per_s", 0):
                    row.update(texts_per_s=rate, batch_ms_median=sorted(batch_times)[len(batch_times) // 2] * 1000)
        torch.set_num_threads(max(RAW_THREADS))
        labels = raw.predict(texts)
    finally:
        torch.set_num_threads(previous)
    return {"runs": results, "labels": labels}


#: Texts the service can hold at once at its highest load level: one text a request, one request a client.
#: The ceiling counts only configurations holding at most this many (lanes x batch): 2 lanes of 32 would
#: need 64 texts in flight, which 32 clients never send.
IN_FLIGHT = max(LEVELS)
#: The ceiling as the headline ratios name it.
CEILING_NAME = f"raw ceiling (same windows, any batching of <= {IN_FLIGHT} texts in flight, 1-2 threads, lanes)"


#: How many of the ceiling's best configurations are measured again beside the service's level at 32 clients.
PAIRED_CONFIGS = 2


def _trials(runs: dict[str, Any]) -> dict[str, list[float]]:
    return {key: row["trials"] for key, row in runs.items()}


def in_flight(row: dict[str, Any]) -> int:
    """Texts a configuration holds at once: a batch on each lane."""
    return row["batch"] * row.get("lanes", 1)


def counted(runs: dict[str, Any], wide: bool = False) -> list[dict[str, Any]]:
    """The configurations the ceiling counts (at most `IN_FLIGHT` texts at once), or (`wide`) those it does not."""
    return [r for r in runs.values() if (in_flight(r) > IN_FLIGHT) == wide]


def best(runs: dict[str, Any], threads: Optional[int] = None, mode: Optional[str] = None, lanes: Optional[int] = None) -> dict[str, Any]:
    """The fastest counted configuration (`counted`) of the given torch threads, batching mode and lanes (none given: the ceiling)."""
    return max((r for r in counted(runs) if (threads is None or r["threads"] == threads) and (mode is None or r["mode"] == mode)
                and (lanes is None or r.get("lanes", 1) == lanes)),
               key=lambda r: r["texts_per_s"])


def _config(row: dict[str, Any]) -> str:
    lanes = row.get("lanes", 1)
    return (f"{row['threads']} torch thread(s), batch {row['batch']}, {row['mode']}"
            + ("" if lanes == 1 else f", {lanes} lanes (Python threads) at once"))


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


def _table(results: dict[str, dict[int, LoadResult]], rss: dict[str, Optional[float]]) -> list[str]:
    lines = ["subject | clients | req/s | p50 ms | p99 ms | non-200+errors | RSS MiB"]
    for name, levels in results.items():
        for c, r in levels.items():
            lines.append(f"{name} | {c} | {r.rps:.1f} | {r.p50_ms or 0:.0f} | {r.p99_ms or 0:.0f} | {r.bad} | "
                         f"{'-' if rss.get(name) is None else f'{rss[name]:.0f}'}")
    return lines


def run(lab: Lab, quick: bool) -> AreaReport:
    from bench import peers as peer_mod
    from bench.profile import cpu_split, profile_service

    report = AreaReport("hotpath", "classify throughput and latency, demo MiniLM, one text per request; peers; profile")
    duration, warmup, raw_s, trials, profile_s = (3.0, 1.0, 0.7, 1, 4.0) if quick else (15.0, 3.0, 2.5, 2, 12.0)
    demo = lab.demo()
    texts = text_mix()

    # --quick: the raw configurations that won before; the same subjects and peers as a full run, shorter levels.
    quick_configs = [(1, 8, "mixed", 1), (1, 8, "sorted", 1), (1, SERVICE_WINDOW, "grouped", 1), (2, SERVICE_WINDOW, "grouped", 1),
                     (1, SERVICE_WINDOW // RAW_LANES, "grouped", RAW_LANES)]
    raw_model = RawModel(lab)
    raw = raw_ceiling(raw_model, texts, raw_s, trials, configs=quick_configs if quick else None)
    runs = raw["runs"]

    # Every server up at once, levels interleaved (each subject in turn, per level): drift in the
    # other work on a shared machine then falls on all alike. An idle server costs little CPU.
    # Started side by side (each start mostly waits on imports and loading).
    from concurrent.futures import ThreadPoolExecutor

    def timed(fn: Any) -> Any:
        t0 = time.perf_counter()
        return fn(), time.perf_counter() - t0

    skipped: dict[str, str] = {}
    # Peers in every configuration (bench/peers.py), quick or full: the comparison is with each peer's best.
    starts: dict[str, Any] = {peer_mod.config_name("bentoml-batchable", cfg): (lambda cfg=cfg: peer_mod.bentoml_batchable(lab, **cfg))
                              for cfg in peer_mod.BENTOML_CONFIGS}
    why_not = peer_mod.ensure_mlserver(lab.say)
    for cfg in peer_mod.MLSERVER_CONFIGS:
        name = peer_mod.config_name("mlserver", cfg)
        if why_not:
            skipped[name] = why_not
        else:
            starts[name] = lambda cfg=cfg: peer_mod.mlserver(lab, **cfg)
    gate = json.dumps({demo.name: {"path": str(GATE_PATH), "min_accuracy": 0.0}})  # parity of the accelerations on the gate set
    variants: dict[str, dict[str, Any]] = {
        "service": {},
        **{f"service-{kind}": {"REGISTRY_ACCELERATE": kind} for kind in ACCELERATED},
        "service-2-workers": {"workers": 2},  # both cores, one torch thread each
        "service-1-lane": {"REGISTRY_FORWARD_THREADS": "1", "REGISTRY_TORCH_THREADS": "1"},  # the former default
    }
    # Two waves (the services and mlflow, then the peers): 17 servers loading at once on 2 cores would each wait minutes.
    with ThreadPoolExecutor(max_workers=len(variants) + 1 + len(starts)) as pool:
        f_services = {name: pool.submit(lab.service, REGISTRY_GATE=gate, ready_timeout=READY_TIMEOUT, **env)
                      for name, env in variants.items()}
        f_mls = pool.submit(timed, lab.mlflow_models_serve)
        services: dict[str, Any] = {}
        ready_times: dict[str, float] = {}
        for name, fut in f_services.items():
            services[name], ready_times[name] = fut.result()
        mls, mls_start_s = f_mls.result()
        f_peers = {name: pool.submit(start) for name, start in starts.items()}
        peers: dict[str, Any] = {}
        for name, fut in f_peers.items():
            try:
                peers[name] = fut.result()
            except Exception as exc:  # a peer that does not start is reported, the rest is still measured
                skipped[name] = f"{type(exc).__name__}: {str(exc)[-800:]}"
    svc, ready_s = services["service"], ready_times["service"]
    subjects: dict[str, tuple[str, str, list[bytes]]] = {}  # name -> (url, path, bodies)
    results: dict[str, dict[int, LoadResult]] = {}
    mean_batch: dict[str, dict[int, Optional[float]]] = {name: {} for name in services}
    loadavg: dict[str, float] = {}
    labels: dict[str, list[str]] = {}
    rss: dict[str, Optional[float]] = {}
    profile: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    execution: dict[str, str] = {}
    runner_info: dict[str, Any] = {}
    paired: dict[str, Any] = {}  # the ceiling's best configurations, measured beside the service's level at 32 clients
    try:
        service_bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
        for name, proc in services.items():
            answer = proc.classify(texts).json()
            labels[name] = [p["label"] for p in answer["predictions"]]
            execution[name] = answer["model"].get("execution", "eager")
            runner_info[name] = get_json(proc.client, "/models")["models"][demo.name].get("runner", {})
            subjects[name] = (proc.url, "/classify", service_bodies)
        served_version = svc.classify(texts[:1]).json()["model"]["version"]
        first = httpx.post(mls.url + "/invocations", json={"inputs": texts}, timeout=120)
        first.raise_for_status()
        labels["mlflow"] = [p["label"] for p in first.json()["predictions"]]
        subjects["mlflow"] = (mls.url, "/invocations", [json.dumps({"inputs": [t]}).encode() for t in texts])
        for name, peer in peers.items():
            labels[name] = peer.labels(texts)
            subjects[name] = (peer.url, peer.path, [peer.body(t) for t in texts])
        # The ceiling's best configurations again right before and right after the service's level at 32 clients:
        # the machine's speed drifts (shared hosts), and the headline ratio compares figures of the same minutes.
        beside = [(r["threads"], r["batch"], r["mode"], r["lanes"])
                  for r in sorted(counted(runs), key=lambda r: r["texts_per_s"], reverse=True)[:PAIRED_CONFIGS]]
        for c in LEVELS:
            for name, (url, path, bodies) in subjects.items():
                loadavg[f"{name}_{c}"] = os.getloadavg()[0]
                paired_level = name == "service" and c == IN_FLIGHT
                if paired_level:
                    raw_ceiling(raw_model, texts, raw_s, 1, configs=beside, results=paired)
                if name in services and name != "service-2-workers":  # /models counts one worker's batches only
                    levels, batches = service_levels(services[name], demo.name, bodies, duration, warmup, levels=(c,))
                    results.setdefault(name, {})[c], mean_batch[name][c] = levels[c], batches[c]
                else:
                    results.setdefault(name, {})[c] = run_load(url, path, bodies, c, duration, warmup)
                if paired_level:
                    raw_ceiling(raw_model, texts, raw_s, 1, configs=beside, results=paired)
        # The ceiling again, now, for its best configurations: other work on the machine moves during a run,
        # and a ceiling measured only before the servers started could be lower than what the service then reached.
        top = sorted(counted(runs), key=lambda r: r["texts_per_s"], reverse=True)[:3] + sorted(
            counted(runs, wide=True), key=lambda r: r["texts_per_s"], reverse=True)[:1]  # and the widest's best
        raw_ceiling(raw_model, texts, raw_s, 1, configs=[(r["threads"], r["batch"], r["mode"], r["lanes"]) for r in top], results=runs)
        for name, proc in (*((n, p.proc) for n, p in services.items()), ("mlflow", mls.proc),
                           *((n, p.server.proc) for n, p in peers.items())):
            rss[name] = rss_mib(proc.pid) if proc else None
        for name, proc in services.items():  # again: the counters since load (rows rerun near a tie)
            runner_info[name] = get_json(proc.client, "/models")["models"][demo.name].get("runner", {})
        profile = profile_service(svc, service_bodies, 32, profile_s)
        try:
            cpu = cpu_split(svc, service_bodies, 32, profile_s)
        except Exception as exc:  # a diagnostic: its failure must not cost the run's figures
            cpu = {"summary": f"not measured: {type(exc).__name__}: {exc}", "cores": {}}
    finally:
        for server in (*services.values(), mls, *peers.values()):
            server.stop()

    ceiling, raw_2t, raw_1t = best(runs), best(runs, 2, lanes=1), best(runs, 1, lanes=1)
    bucketed, grouped, laned = best(runs, mode="sorted"), best(runs, mode="grouped", lanes=1), best(runs, lanes=RAW_LANES)
    service, mlflow = results["service"], results["mlflow"]
    report.add("raw model ceiling: best of threads x batching x lanes", ceiling["texts_per_s"], "texts/s", key="raw_ceiling",
               note=f"{_config(ceiling)}; every text read in the service's windows; over mix-order batches 1-32, length-sorted "
                    f"batches 8-32, the service's windows of 32 in length groups of <= {SERVICE_GROUP} at threads 1 and 2, and the "
                    f"same on {RAW_LANES} lanes of 1 thread, at most {IN_FLIGHT} texts in flight")
    wide = max(counted(runs, wide=True), key=lambda r: r["texts_per_s"], default=None)
    if wide is not None:  # none in --quick
        report.add(f"raw model, more than {IN_FLIGHT} texts in flight", wide["texts_per_s"], "texts/s", "raw ceiling",
                   ceiling["texts_per_s"], note=f"{_config(wide)}; not a batching {IN_FLIGHT} clients can give the service",
                   key="raw_wide")
    report.add("raw model, 2 threads, best batching", raw_2t["texts_per_s"], "texts/s", "raw ceiling", ceiling["texts_per_s"],
               note=_config(raw_2t), key="raw_2threads")
    report.add("raw model, 1 thread, best batching", raw_1t["texts_per_s"], "texts/s", "raw ceiling", ceiling["texts_per_s"],
               note=_config(raw_1t), key="raw_1thread")
    report.add("raw model, length-sorted batches", bucketed["texts_per_s"], "texts/s", "raw ceiling", ceiling["texts_per_s"],
               note=f"{_config(bucketed)}; the whole mix sorted by length", key="raw_sorted")
    report.add("raw model, the service's grouping, one lane", grouped["texts_per_s"], "texts/s", "raw ceiling", ceiling["texts_per_s"],
               note=f"{_config(grouped)}; windows in mix order, length groups of <= {SERVICE_GROUP}", key="raw_grouped")
    report.add(f"raw model, the service's grouping on {RAW_LANES} lanes", laned["texts_per_s"], "texts/s", "raw ceiling",
               ceiling["texts_per_s"], note=_config(laned), key="raw_lanes")
    for c in LEVELS:
        s, m = service[c], mlflow[c]
        report.add(f"service throughput, {c} clients, vs ceiling", s.rps, "req/s", "raw ceiling", ceiling["texts_per_s"],
                   key=f"svc_rps_vs_raw_{c}", note=f"mean batch formed by the service: {mean_batch['service'][c]}")
        report.add(f"service throughput, {c} clients, vs mlflow", s.rps, "req/s", "mlflow models serve", m.rps, key=f"svc_rps_vs_mlflow_{c}")
        report.add(f"service p50, {c} clients", s.p50_ms, "ms", "mlflow models serve p50", m.p50_ms, key=f"svc_p50_{c}")
        report.add(f"service p99, {c} clients", s.p99_ms, "ms", "mlflow models serve p99", m.p99_ms, key=f"svc_p99_{c}")
        report.add(f"service non-200 + errors, {c} clients", float(s.bad), "count", "mlflow models serve", float(m.bad), key=f"svc_bad_{c}")
    report.add("service RSS after load", rss.get("service"), "MiB", "mlflow models serve RSS", rss.get("mlflow"), key="rss")

    # The issue's headline ratios, all at 32 clients, all from this run.
    s32 = service[32]
    beside_best = best(paired)
    report.add("service vs honest raw ceiling, 32 clients", s32.rps, "req/s", CEILING_NAME + ", measured beside the service",
               beside_best["texts_per_s"], key="svc_vs_ceiling_32",
               note=f"{_config(beside_best)}, best of the run's top {PAIRED_CONFIGS} configurations measured right before and "
                    f"right after the service's level (trials {', '.join(f'{k}: {v}' for k, v in _trials(paired).items())})")
    report.add("service vs the run's best raw ceiling, 32 clients", s32.rps, "req/s", CEILING_NAME + ", best of the whole run",
               ceiling["texts_per_s"], key="svc_vs_run_ceiling_32",
               note="the ceiling's best trial at any time of the run, before the servers started included")
    report.add("service p99 vs p50, 32 clients", s32.p99_ms, "ms", "service p50", s32.p50_ms, key="svc_p99_over_p50_32")
    w2 = results["service-2-workers"][32]
    report.add("service, REGISTRY_WORKERS=2, vs honest raw ceiling, 32 clients", w2.rps, "req/s", CEILING_NAME,
               ceiling["texts_per_s"], key="svc2w_vs_ceiling_32",
               note=f"p50 {w2.p50_ms or 0:.0f} ms, p99 {w2.p99_ms or 0:.0f} ms, non-200 {w2.bad}; RSS {rss.get('service-2-workers')} MiB")
    one = results["service-1-lane"][32]
    report.add("service vs one forward lane of one torch thread (the former default), 32 clients", s32.rps, "req/s",
               "REGISTRY_FORWARD_THREADS=1, REGISTRY_TORCH_THREADS=1", one.rps, key="svc_vs_one_lane_32",
               note=f"one lane: p50 {one.p50_ms or 0:.0f} ms, p99 {one.p99_ms or 0:.0f} ms, non-200 {one.bad}")
    for kind in ACCELERATED:
        name = f"service-{kind}"
        key = "accel" if kind == "int8" else f"accel_{kind.replace('-', '_')}"  # int8 keeps the keys of earlier runs
        info = runner_info.get(name, {}).get("accelerate") or {}
        # A refused form serves the eager model: its figures are the eager model's, and say so.
        refused = "" if execution.get(name) == kind else str(info.get("refused") or f"execution {execution.get(name)}")
        for c in LEVELS:
            a = results[name][c]
            report.add(f"REGISTRY_ACCELERATE={kind} throughput, {c} clients", a.rps, "req/s", "service, eager", service[c].rps,
                       key=f"{key}_vs_eager_{c}", note=f"execution {execution[name]}; p50 {a.p50_ms or 0:.0f} ms, p99 {a.p99_ms or 0:.0f} ms; "
                                                      f"mean batch {mean_batch[name][c]}", refused=refused)
        report.add(f"REGISTRY_ACCELERATE={kind} non-200 + errors, 32 clients", float(results[name][32].bad), "count", key=f"{key}_bad_32")
        mismatch = sum(a != b for a, b in zip(labels[name], labels["service"], strict=True))
        parity = info.get("parity") or {}
        report.add(f"REGISTRY_ACCELERATE={kind} labels differing from eager (56-text mix)", float(mismatch), "count",
                   key=f"{key}_label_mismatches", refused=refused,
                   note=f"execution {execution[name]}; " + (f"refused: {refused}" if refused else
                        f"parity on the {parity.get('source')}: {parity.get('label_mismatches')} labels differ, "
                        f"max probability difference {parity.get('max_diff')}; {parity.get('engine')}")
                   + (f"; rows near a tie rerun in f32 (since load): {runner_info[name]['near_tie']}" if runner_info.get(name, {}).get("near_tie")
                      else ""))
    serving = [k for k in ACCELERATED if execution.get(f"service-{k}") == k]
    if serving:
        top_kind = max(serving, key=lambda k: results[f"service-{k}"][32].rps)
        t = results[f"service-{top_kind}"][32]
        report.add("fastest acceleration vs eager, 32 clients", t.rps, "req/s", "service, eager", s32.rps, key="accel_best_vs_eager_32",
                   note=f"REGISTRY_ACCELERATE={top_kind}; " + ", ".join(f"{k} {results[f'service-{k}'][32].rps / s32.rps:.2f}x"
                                                                       for k in ACCELERATED))
        gate_mismatch = (runner_info[f"service-{top_kind}"].get("accelerate") or {}).get("parity", {}).get("label_mismatches")
        mix_mismatch = sum(a != b for a, b in zip(labels[f"service-{top_kind}"], labels["service"], strict=True))
        report.add("fastest acceleration: labels differing from eager, gate set + 56-text mix", float((gate_mismatch or 0) + mix_mismatch),
                   "count", key="accel_best_label_mismatches", note=f"{top_kind}: gate set {gate_mismatch}, mix {mix_mismatch}")
    report.add("service vs mlflow models serve, 32 clients", s32.rps, "req/s", "mlflow models serve", mlflow[32].rps, key="svc_vs_mlflow_32")
    peer_best: dict[str, dict[str, Any]] = {}
    for family, key in (("bentoml-batchable", "svc_vs_bentoml_batchable_32"), ("mlserver", "svc_vs_mlserver_32")):
        configs = {name: levels for name, levels in results.items() if name.startswith(family + "-")}
        if configs:
            name, c = max(((n, c) for n, levels in configs.items() for c in levels), key=lambda nc: configs[nc[0]][nc[1]].rps)
            top = configs[name][c]
            peer_best[family] = {"config": name, "clients": c, "rps": top.rps}
            report.add(f"service vs {family} at its best, 32 clients", s32.rps, "req/s",
                       f"{family}: best of {len(configs)} configurations x 1/8/32 clients", top.rps, key=key,
                       note=f"best: {name} at {c} clients; every configuration: " + "; ".join(
                           f"{n} " + "/".join(f"{r.rps:.1f}" for r in levels.values()) + " req/s at 1/8/32"
                           for n, levels in configs.items())
                           + "".join(f"; {n} not measured: {why}" for n, why in skipped.items() if n.startswith(family)))
        else:
            report.add(f"service vs {family} at its best, 32 clients", s32.rps, "req/s", f"{family} (not measured)", None, key=key,
                       note="not measured: " + "; ".join(f"{n}: {why}" for n, why in skipped.items() if n.startswith(family)))
    for name, fig in (profile.get("shares") or {}).items():
        report.add(f"profile, 32 clients: {name} share of service CPU samples", fig, "x", key=f"profile_{name}")

    agree = {name: sum(a == b for a, b in zip(got, labels["service"], strict=True)) for name, got in labels.items()}
    agree_raw = sum(a == b for a, b in zip(labels["service"], raw["labels"], strict=True))
    report.notes.append(f"labels agree with the service's (version {served_version}) on: "
                        + ", ".join(f"{name} {n}/{len(texts)}" for name, n in agree.items()) + f", raw model {agree_raw}/{len(texts)}")
    report.notes.append("per subject and level (same load generator, same run):")
    report.notes.extend("  " + line for line in _table(results, rss))
    for name, why in skipped.items():
        report.notes.append(f"{name} not measured: {why}")
    report.notes.append(f"each level: {warmup:.0f} s warm-up, then {duration:.0f} s measured"
                        f"{' (throughput per third of the window in the JSON file)' if duration >= 9 else ''}; subjects interleaved per level; "
                        f"text mix of {len(texts)} texts, {min(map(len, texts))}-{max(map(len, texts))} characters; "
                        f"raw: best of {trials} x {raw_s:.1f} s per configuration, the top 3 measured once more after the levels")
    report.notes.append("load generator CPU (s per s): " + "; ".join(
        f"{name} " + "/".join(str(r.client_cpu) for r in levels.values()) for name, levels in results.items()))
    report.notes.append("ready in: " + ", ".join(f"{n} {t:.1f} s" for n, t in ready_times.items())
                        + f"; mlflow models serve up in {mls_start_s:.1f} s")
    if profile:
        report.notes.append(f"profile: {profile.get('summary')}")
    for name, fig in (cpu.get("cores") or {}).items():
        if name != "cpus":
            report.add(f"CPU at 32 clients, no profiler: {name.replace('_', ' ')}", fig, "x" if "share" in name else "cores",
                       key=f"cpu_{name}")
    if cpu:
        report.notes.append(f"CPU split: {cpu.get('summary')}")
    report.detail = {
        "raw": runs,
        "raw_labels_agree_with_service": agree_raw,
        "service": {c: r.to_dict() for c, r in service.items()},
        "service_mean_batch": mean_batch["service"],
        "mlflow_models_serve": {c: r.to_dict() for c, r in mlflow.items()},
        "subjects": {name: {c: r.to_dict() for c, r in levels.items()} for name, levels in results.items()},
        "mean_batch": mean_batch,
        "rss_mib": rss,
        "labels_agree_with_service": agree,
        "int8_runner": runner_info.get("service-int8"),
        "runners": runner_info,
        "execution": execution,
        "peer_best": peer_best,
        "service_ready_s_all": {n: round(t, 2) for n, t in ready_times.items()},
        "skipped": skipped,
        "profile": profile,
        "cpu_split": cpu,
        "loadavg_at_level_start": loadavg,
        "service_ready_s": round(ready_s, 2),
        "mlflow_models_serve_start_s": round(mls_start_s, 2),
        "demo_model": {"registered": demo.registered_name, "meta": demo.meta},
        "durations": {"measured_s": duration, "warmup_s": warmup, "raw_per_config_s": raw_s, "raw_trials": trials},
    }
    return report
