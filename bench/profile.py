"""One profiled run: where the service's CPU time goes at a given load (py-spy, sampling, non-blocking).

py-spy samples every thread of the `bentoml serve` process tree while the load generator runs;
each sample's stack is put in one bucket by its innermost recognised frame:
tokenize (the tokenizer), forward (torch / the model), serialize (JSON and pydantic in and out),
HTTP (the ASGI server, the framework, the event loop), other. Idle threads are not sampled, so
the shares are of CPU time actually spent. Needs `py-spy` (`pip install py-spy`); without it the
figures are absent and the report says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.load import run_load

BUCKETS = ("tokenize", "forward", "serialize", "HTTP", "other")
#: (bucket, substrings of a frame) checked from the innermost frame outwards; the first hit decides.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tokenize", ("tokenization_utils", "tokenizers/", "/tokenization_", "tokenize (", "convert_to_tensors", " pad (")),
    ("forward", ("torch/", "transformers/models/", "transformers/modeling", "predict_encoded", "logits_of")),
    ("serialize", ("json", "pydantic", "serializ", "io_models", "io_descriptors", "model_dump", "payload")),
    ("HTTP", ("uvicorn", "starlette", "h11", "httptools", "asyncio", "anyio", "bentoml", "_bentoml", "uvloop", "socket",
              "selectors", "http")),
)


def _bucket(frames: Sequence[str]) -> str:
    for frame in reversed(frames):  # innermost last in py-spy's raw format
        for bucket, needles in RULES:
            if any(n in frame for n in needles):
                return bucket
    return "other"


def classify_raw(text: str) -> tuple[Counter, int]:
    """Samples per bucket from py-spy's raw (collapsed) output."""
    counts: Counter = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        counts[_bucket(frames)] += int(n)
        total += int(n)
    return counts, total


def _py_spy() -> Optional[str]:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


def profile_service(svc: Any, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """Load the service with `clients` for `seconds` while py-spy samples it; shares of CPU samples per bucket."""
    binary = _py_spy()
    if binary is None or svc.proc is None:
        return {"summary": "not profiled: py-spy is not installed (pip install py-spy)", "shares": {}}
    out = Path(svc.log_path).with_name(f"profile-{int(time.time())}.txt")
    argv = [binary, "record", "--pid", str(svc.proc.pid), "--subprocesses", "--nonblocking", "--threads", "--rate", "200",
            "--format", "raw", "--duration", str(int(seconds) + 1), "-o", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # py-spy attaches
    load = run_load(svc.url, "/classify", bodies, clients, seconds, 0.5)
    try:
        _, err = spy.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not out.exists():
        return {"summary": f"not profiled: py-spy wrote nothing ({(err or '').strip()[-300:]})", "shares": {}}
    counts, total = classify_raw(out.read_text())
    shares = {b: round(counts[b] / total, 4) if total else 0.0 for b in BUCKETS}
    summary = (f"{clients} clients, {seconds:.0f} s, {load.rps:.1f} req/s while sampled (py-spy non-blocking, 200 Hz), "
               f"{total} CPU samples: " + ", ".join(f"{b} {shares[b] * 100:.0f}%" for b in BUCKETS) + f"; raw stacks in {out.name}")
    return {"summary": summary, "shares": shares, "samples": dict(counts), "total": total, "rps": round(load.rps, 2),
            "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "file": str(out)}


def _thread_ticks(pid: int) -> dict[tuple[int, int], int]:
    """CPU clock ticks (user + system) of every thread of `pid` and its descendants, by (process, thread)."""
    import psutil

    ticks: dict[tuple[int, int], int] = {}
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return ticks
    for proc in procs:
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            ticks[(proc.pid, int(task.name))] = int(fields[11]) + int(fields[12])
    return ticks


def _machine_idle() -> tuple[int, int]:
    """(idle + iowait ticks, all ticks) of the whole machine so far (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values)


def cpu_split(svc: Any, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    """Where the worker's CPU goes under load, without a profiler attached (Linux /proc): cores used by each
    process's main thread (the event loop of a worker), by its other threads (forward lanes, the runtimes'
    own threads), and how idle the machine stays. Threads waiting for the GIL use no CPU: idle here is CPU
    nobody could use, the closed loop's gaps between a pass's answers and the requests they bring back."""
    import threading

    if svc.proc is None or not Path("/proc/stat").exists():
        return {"summary": "not measured: no /proc", "cores": {}}
    result: dict[str, Any] = {}
    load = threading.Thread(target=lambda: result.setdefault("load", run_load(svc.url, "/classify", bodies, clients, seconds + 2, 1)))
    load.start()
    time.sleep(1.5)  # warm-up, and the first requests' burst
    before, idle_before = _thread_ticks(svc.proc.pid), _machine_idle()
    started = time.perf_counter()
    time.sleep(seconds)
    after, idle_after = _thread_ticks(svc.proc.pid), _machine_idle()
    window = time.perf_counter() - started
    load.join()
    if "load" not in result:
        return {"summary": "not measured: the load run failed", "cores": {}}
    hz = os.sysconf("SC_CLK_TCK")
    main = sum(t - before.get(k, 0) for k, t in after.items() if k[0] == k[1]) / hz / window
    other = sum(t - before.get(k, 0) for k, t in after.items() if k[0] != k[1]) / hz / window
    idle = (idle_after[0] - idle_before[0]) / max(1, idle_after[1] - idle_before[1])
    cores = {"main_threads": round(main, 3), "other_threads": round(other, 3), "machine_idle_share": round(idle, 3),
             "cpus": os.cpu_count()}
    summary = (f"{clients} clients, {window:.0f} s, {result['load'].rps:.1f} req/s: main thread(s) (event loop) {main:.2f} cores, "
               f"other threads (forward lanes, runtimes) {other:.2f} cores, machine idle {idle * 100:.0f}% of {os.cpu_count()} CPUs")
    return {"summary": summary, "cores": cores, "rps": round(result["load"].rps, 2)}
