"""Cold start: process start to /readyz 200, beside the raw load of the same model.

Baselines, from warm to cold: the runner's load in this (already warm) process; a fresh Python doing
what the service's worker does with no server around it (import, resolve through the same chain,
load); and the import of `service.py` alone in a fresh Python. The service's own load time comes
from `/models` (`runner.load_seconds`); the rest of its cold start is process and import overhead.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.lab import Lab, fresh_python, get_json
from bench.reload import raw_loads
from bench.report import AreaReport, median
from tests.service_proc import ServiceProcess

FRESH_LOAD = """
import json, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from registry.resolver import Resolver
from registry.settings import RegistrySettings
from runners.text import TextClassificationRunner
t1 = time.perf_counter()
settings = RegistrySettings.from_env()
resolution = Resolver.from_settings(settings).resolve(settings.models[0], settings.alias)
t2 = time.perf_counter()
runner = TextClassificationRunner(resolution.record, settings, device="cpu")
runner.load()
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "resolve_s": t2 - t1, "load_s": t3 - t2}))
"""

IMPORT_SERVICE = "import time; t = time.perf_counter(); import service; print(time.perf_counter() - t)"


def run(lab: Lab, quick: bool) -> AreaReport:
    report = AreaReport("coldstart", "process start to /readyz 200, beside raw model load")
    n = 1 if quick else 3
    demo = lab.demo()

    starts: list[dict[str, Any]] = []
    for _ in range(n):
        env = lab.service_env()
        t0 = time.perf_counter()
        svc = ServiceProcess(lab.log_dir, env, workers=1)
        svc.start_timeout = 240
        lab.own(svc)
        try:
            svc.start()  # returns once /livez answers
            live = time.perf_counter() - t0
            svc.wait_ready(timeout=240)
            ready = time.perf_counter() - t0
            described = get_json(svc.client, "/models")["models"][demo.name]
            starts.append({"ready_s": ready, "live_s": live, "model_load_s": described["runner"]["load_seconds"],
                           "trail_ms": sum(step["elapsed_ms"] for step in described["trail"])})
        finally:
            svc.stop()

    raw = raw_loads(lab, 1 if quick else 3)
    fresh_env = {k: v for k, v in lab.service_env().items() if k.startswith(("REGISTRY_", "MLFLOW_"))}
    fresh_runs = []
    for _ in range(n):
        wall, out = fresh_python(FRESH_LOAD, env=fresh_env)
        fresh_runs.append({"wall_s": wall, **json.loads(out.strip().splitlines()[-1])})
    import_s, _ = fresh_python(IMPORT_SERVICE)

    ready_s = median([s["ready_s"] for s in starts])
    fresh_s = median([r["wall_s"] for r in fresh_runs])
    report.add("service: spawn to /readyz 200, vs raw load", ready_s, "s", "raw load in a warm process", median(raw), key="cold_vs_raw")
    report.add("service: spawn to /readyz 200, vs fresh python", ready_s, "s", "fresh python: import+resolve+load", fresh_s, key="cold_vs_fresh")
    report.add("service: spawn to /livez 200", median([s["live_s"] for s in starts]), "s", "fresh python: import+resolve+load",
               fresh_s, key="live")
    report.add("service: model load inside the worker", median([s["model_load_s"] for s in starts]), "s", "raw load in a warm process",
               median(raw), key="worker_load")
    report.add("fresh python: imports (torch, registry, runner)", median([r["imports_s"] for r in fresh_runs]), "s", key="fresh_imports")
    report.add("fresh python: resolve (MLflow sqlite)", median([r["resolve_s"] for r in fresh_runs]), "s", key="fresh_resolve")
    report.add("fresh python: load", median([r["load_s"] for r in fresh_runs]), "s", "raw load in a warm process", median(raw),
               key="fresh_load")
    report.add("fresh python: import service.py", import_s, "s", key="import_service")
    report.notes.append(f"{n} service start(s); the demo artifact is in the warm artifact cache for every load compared here")
    report.detail = {"service_starts": starts, "raw_load_s": raw, "fresh_python": fresh_runs, "import_service_s": import_s}
    return report
