"""Reload: POST /reload to the new version answering, beside the raw load of the same artifact; and
classify latency while a reload runs, beside steady state at the same load.

The service starts on version 1 of the demo model and switches to `latest` (version 2) and back to a
pinned version 1, again and again; both artifacts are in
the warm artifact cache, which the raw in-process load (`TextClassificationRunner(record).load()`)
reads too. A poller sends classify every 10 ms from the moment the reload is posted and notes the
first answer from the new version.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Optional

import httpx

from bench.demo_model import text_mix
from bench.lab import Lab
from bench.load import BackgroundLoad, run_load, stats
from bench.report import AreaReport, median
from tests.service_proc import ADMIN_TOKEN

CLIENTS = 8


def artifact_checks(lab: Lab, n: int) -> list[float]:
    """Seconds of `ArtifactStore.fetch` on a warm cache: the part of every load that re-digests the cached files."""
    from runners.artifacts import ArtifactStore

    demo = lab.demo()
    store = ArtifactStore(demo.settings())
    out = []
    for i in range(n):
        start = time.perf_counter()
        store.fetch(demo.records["2" if i % 2 == 0 else "1"])
        out.append(time.perf_counter() - start)
    return out


def raw_loads(lab: Lab, n: int) -> list[float]:
    """Seconds of `TextClassificationRunner(record, settings).load()` in this process, versions alternating."""
    import torch

    from runners.text import TextClassificationRunner

    demo = lab.demo()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # what a service worker runs with
    try:
        for version in ("1", "2"):  # fill the artifact cache for both, untimed
            runner = TextClassificationRunner(demo.records[version], demo.settings(), device="cpu")
            runner.load()
            runner.close()
        out = []
        for i in range(n):
            runner = TextClassificationRunner(demo.records["2" if i % 2 == 0 else "1"], demo.settings(), device="cpu")
            start = time.perf_counter()
            runner.load()
            out.append(time.perf_counter() - start)
            runner.close()
        return out
    finally:
        torch.set_num_threads(previous)


#: Alternating reloads: to `latest` (version 2, resolved through the chain) and back to a pinned version 1.
REQUESTS = ({"alias": "latest"}, "2"), ({"version": "1"}, "1")


def reload_once(url: str, name: str, body: dict[str, Any], target: str) -> dict[str, Any]:
    """Post the reload and poll classify until `target` answers; seconds to the flip and to the reply."""
    flipped: dict[str, float] = {}
    done = threading.Event()
    poll_client = httpx.Client(base_url=url, timeout=60)
    admin_client = httpx.Client(base_url=url, timeout=300)
    t0 = time.perf_counter()

    def poll() -> None:
        while not done.is_set() and time.perf_counter() - t0 < 300:
            try:
                r = poll_client.post("/classify", json={"texts": ["is the new version answering?"]})
                if r.status_code == 200 and r.json()["model"]["version"] == target:
                    flipped["at"] = time.perf_counter()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    try:
        poller.start()
        response = admin_client.post("/reload", json={"model": name, **body}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        replied = time.perf_counter()
        poller.join(timeout=120)
    finally:
        done.set()
        poll_client.close()
        admin_client.close()
    if response.status_code != 200:
        raise RuntimeError(f"reload {body} answered {response.status_code}: {response.text[:500]}")
    reply = response.json()
    if reply["current"]["version"] != target:
        raise RuntimeError(f"reload {body} switched to version {reply['current']['version']}, expected {target}")
    return {
        "request": body,
        "target": target,
        "to_new_version_s": (flipped["at"] - t0) if "at" in flipped else None,
        "post_s": replied - t0,
        "window": (t0, replied),
        "service_elapsed_ms": reply.get("elapsed_ms"),
        "trail": reply.get("trail"),
    }


def run(lab: Lab, quick: bool) -> AreaReport:
    report = AreaReport("reload", "POST /reload to the new version answering; latency during a reload")
    n_idle, n_loaded, steady_s = (2, 2, 5.0) if quick else (5, 6, 15.0)
    demo = lab.demo()
    texts = text_mix()
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]

    raw = raw_loads(lab, n_idle)
    fetch = artifact_checks(lab, n_idle)
    svc, _ = lab.service()
    idle: list[dict[str, Any]] = []
    loaded: list[dict[str, Any]] = []
    try:
        # The first reload after start is reported on its own; the pair warms the worker's second artifact.
        first = reload_once(svc.url, demo.name, *REQUESTS[0])
        reload_once(svc.url, demo.name, *REQUESTS[1])
        for i in range(n_idle):
            time.sleep(0.5)
            idle.append(reload_once(svc.url, demo.name, *REQUESTS[i % 2]))
        steady = run_load(svc.url, "/classify", bodies, CLIENTS, steady_s, warmup=2.0)
        with BackgroundLoad(svc.url, "/classify", bodies, CLIENTS) as load:
            time.sleep(2.0)  # warm-up
            for i in range(n_loaded):
                loaded.append(reload_once(svc.url, demo.name, *REQUESTS[(i + n_idle) % 2]))
                time.sleep(1.0)
        windows = [r["window"] for r in loaded]
        during = load.overlapping(windows)
        during_stats = stats(during, CLIENTS, sum(b - a for a, b in windows))
        outside_s = max(load.stopped_at - load.started_at - 2.0 - sum(b - a for a, b in windows), 1e-9)
        between = stats(load.outside(windows, after=load.started_at + 2.0), CLIENTS, outside_s)
    finally:
        svc.stop()

    def med(rows: list[dict[str, Any]], key: str) -> Optional[float]:
        return median([r[key] for r in rows if r[key] is not None])

    raw_s = median(raw)
    report.add("reload, idle: POST to new version answering", med(idle, "to_new_version_s"), "s", "raw load of the artifact", raw_s,
               key="reload_idle")
    report.add("reload, idle: POST reply", med(idle, "post_s"), "s", "raw load of the artifact", raw_s, key="reload_idle_post")
    report.add("  of the raw load: artifact cache check (re-digest)", median(fetch), "s", "raw load of the artifact", raw_s,
               key="fetch_in_load")
    report.add("first reload after start: to new version", first["to_new_version_s"], "s", "raw load of the artifact", raw_s,
               key="reload_first")
    report.add(f"reload under {CLIENTS} clients: to new version", med(loaded, "to_new_version_s"), "s", "raw load of the artifact", raw_s,
               key="reload_loaded")
    report.add(f"classify p99 during reloads ({CLIENTS} clients)", during_stats.p99_ms, "ms", "steady p99, same load", steady.p99_ms,
               key="p99_during_reload")
    report.add("classify p99 during reloads, vs between them", during_stats.p99_ms, "ms", "p99 between reloads, same load run",
               between.p99_ms, key="p99_during_vs_between")
    report.add(f"classify p50 during reloads ({CLIENTS} clients)", during_stats.p50_ms, "ms", "steady p50, same load", steady.p50_ms,
               key="p50_during_reload")
    report.add("non-200 + errors during reloads", float(during_stats.non_200 + during_stats.errors), "count", "steady state",
               float(steady.non_200 + steady.errors), key="bad_during_reload")
    for label, body in (("'latest'", REQUESTS[0][0]), ("a pinned version", REQUESTS[1][0])):
        rows = [r for r in idle + loaded if r["request"] == body and r.get("trail")]
        resolve_ms = median([sum(step["elapsed_ms"] for step in r["trail"]) for r in rows])
        answered = sorted({r["trail"][-1]["source"] for r in rows})
        if resolve_ms is not None:
            report.notes.append(f"resolution inside a reload to {label}: median {resolve_ms:.1f} ms (answered by {', '.join(answered)}); "
                                f"service-side reload median {median([r['service_elapsed_ms'] for r in rows]):.0f} ms")
    report.notes.append(f"{n_idle} idle reloads, {n_loaded} under load; {len(during)} classify requests in flight during reloads; "
                        f"steady window {steady_s:.0f} s; between reloads p99 {between.p99_ms and round(between.p99_ms, 1)} ms")
    report.detail = {
        "raw_load_s": raw,
        "artifact_fetch_s": fetch,
        "first": {k: v for k, v in first.items() if k != "window"},
        "idle": [{k: v for k, v in r.items() if k != "window"} for r in idle],
        "under_load": [{k: v for k, v in r.items() if k != "window"} for r in loaded],
        "steady": steady.to_dict(),
        "during_reload": during_stats.to_dict(),
        "between_reloads": between.to_dict(),
        "clients": CLIENTS,
    }
    return report
