"""Figures, tables and statistics: every value printed beside its baseline and their ratio."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

from registry.settings import ACCELERATIONS


@dataclass
class Figure:
    """One measured value beside the baseline it should be read against."""

    name: str
    value: Optional[float]
    unit: str
    baseline_name: str = ""
    baseline: Optional[float] = None
    note: str = ""
    key: str = ""  # stable id for the JSON file and the targets
    #: Why the configuration this figure is about did not run as asked (a REGISTRY_ACCELERATE form the
    #: service refused, so that the eager model served); a target read from it is "refused", not met or missed.
    refused: str = ""

    @property
    def ratio(self) -> Optional[float]:
        if self.value is None or self.baseline in (None, 0):
            return None
        return self.value / self.baseline

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return data


@dataclass
class AreaReport:
    """What one area measured: its figures in print order, and raw detail for the JSON file."""

    area: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None
    loadavg: Optional[tuple[list[float], list[float]]] = None  # (before, after): other work on the machine shows here

    def add(self, name: str, value: Optional[float], unit: str, baseline_name: str = "", baseline: Optional[float] = None,
            note: str = "", key: str = "", refused: str = "") -> Figure:
        fig = Figure(name, value, unit, baseline_name, baseline, note, key, refused)
        self.figures.append(fig)
        return fig

    def get(self, key: str) -> Optional[Figure]:
        return next((f for f in self.figures if f.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seconds": round(self.seconds, 1),
            "loadavg_before_after": self.loadavg,
            "error": self.error,
            "figures": [f.to_dict() for f in self.figures],
            "notes": self.notes,
            "detail": self.detail,
        }


# -- statistics ---------------------------------------------------------------------------------

def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def repeat(fn: Callable[[], Any], n: int, warmup: int = 3) -> list[float]:
    """Seconds of each of `n` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, p90, p99, min, max in milliseconds, and the count."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "median_ms": _r(median(ms)),
        "p90_ms": _r(percentile(ms, 90)),
        "p99_ms": _r(percentile(ms, 99)),
        "min_ms": _r(min(ms) if ms else None),
        "max_ms": _r(max(ms) if ms else None),
    }


def _r(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else round(value, digits)


# -- the machine --------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal"))
        mem_gib = round(kib / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": mem_gib,
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    info["code"] = code_version()
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    for package in ("bentoml", "mlflow", "transformers", "redis"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # a missing package is reported as absent, not fatal
            info[package] = None
    return info


def code_version() -> dict[str, Any]:
    """The commit measured and the files that differ from it (read-only git queries)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            # --no-optional-locks: `status` must not refresh (write) the index
            return subprocess.run(["git", "--no-optional-locks", *args], capture_output=True, text=True, timeout=10,
                                  check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if len(line) > 3]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "modified": changed}


# -- printing -----------------------------------------------------------------------------------

def fmt_value(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        if value < 1:
            return f"{value * 1000:.0f} µs"
        return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit in ("req/s", "texts/s"):
        return f"{value:.1f} {unit}"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "KiB":
        return f"{value:.1f} KiB"
    if unit == "count":
        return f"{value:.0f}"
    if unit == "x":
        return f"{value:.2f}"
    return f"{value:g} {unit}".strip()


def render(report: AreaReport) -> str:
    rows = [("figure", "value", "baseline", "baseline value", "ratio")]
    for f in report.figures:
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
        rows.append((f.name, fmt_value(f.value, f.unit), f.baseline_name or "-",
                     fmt_value(f.baseline, f.unit) if f.baseline_name else "-", ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    line = "-+-".join("-" * w for w in widths)
    load = "" if not report.loadavg else f"; load average {report.loadavg[0][0]} -> {report.loadavg[1][0]}"
    out = [f"== {report.area}: {report.title} ({report.seconds:.0f} s{load}) =="]
    for i, row in enumerate(rows):
        out.append(" | ".join(cell.ljust(widths[j]) if j in (0, 2) else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            out.append(line)
    for f in report.figures:
        if f.note:
            out.append(f"  * {f.name}: {f.note}")
    out.extend(f"  - {n}" for n in report.notes)
    if report.error:
        out.append(f"  !! area failed: {report.error}")
    return "\n".join(out)


# -- the README's hot-path table ----------------------------------------------------------------

#: How the README names each hot-path subject (bench/hotpath.py); others keep their own name.
SUBJECT_LABELS = {
    "service": "the service (defaults: 2 forward lanes × 1 torch thread), eager",
    "service-int8": "service, `REGISTRY_ACCELERATE=int8` (torch dynamic quantization)",
    "service-onnx": "service, `REGISTRY_ACCELERATE=onnx` (ONNX Runtime, fused graph)",
    "service-onnx-int8": "service, `REGISTRY_ACCELERATE=onnx-int8` (ONNX Runtime, fused, int8 weights)",
    "service-openvino": "service, `REGISTRY_ACCELERATE=openvino` (OpenVINO CPU, f32)",
    "service-openvino-int8": "service, `REGISTRY_ACCELERATE=openvino-int8` (OpenVINO CPU, int8 weights)",
    "service-openvino-bf16": "service, `REGISTRY_ACCELERATE=openvino-bf16` (OpenVINO CPU, bfloat16 on the CPU's bf16 units)",
    "service-2-workers": "service, `REGISTRY_WORKERS=2` (1 lane each)",
    "service-1-lane": "service, one lane of one torch thread (the default before lanes)",
    "mlflow": "`mlflow models serve`",
}


def _peer_label(name: str) -> str:
    family, _, rest = name.partition("-t")
    if family == "bentoml-batchable":
        return f"plain BentoML `batchable=True`, {rest} torch thread(s)"
    if family == "mlserver":
        threads, _, workers = rest.partition("-w")
        return f"MLServer 1.7.1 HF runtime, {threads} thread(s), parallel_workers {workers}"
    return name


def hotpath_markdown(results: dict[str, Any], full: bool = False) -> str:
    """The README's hot-path table from a results file: the eager service, each acceleration, `mlflow models
    serve` and each peer at its best configuration (`full`: every subject and configuration), with req/s at
    1/8/32 clients, p50/p99 at 32 and the ratio to the eager service at 32 clients, all from that one run."""
    detail = results["areas"]["hotpath"]["detail"]
    subjects: dict[str, dict[str, Any]] = detail["subjects"]
    execution = detail.get("execution") or {}
    peer_best = detail.get("peer_best") or {}
    best = {v["config"]: family for family, v in peer_best.items()}

    def level(levels: dict[Any, Any], c: int) -> dict[str, Any]:
        return levels.get(str(c), levels.get(c, {}))

    def accelerated(name: str) -> bool:  # a subject asking for a REGISTRY_ACCELERATE value (bench/hotpath.py's variants)
        return name.startswith("service-") and name.removeprefix("service-") in ACCELERATIONS

    eager32 = level(subjects["service"], 32)["rps"]
    shown = [n for n in subjects if full or n in best or n in ("service", "mlflow") or accelerated(n)]
    lines = ["| subject | req/s at 1 / 8 / 32 clients | p50 / p99 at 32 clients | vs the eager service at 32 |", "|---|---|---|---|"]
    for name in shown:
        rows = [level(subjects[name], c) for c in (1, 8, 32)]
        label = SUBJECT_LABELS.get(name) or _peer_label(name)
        if name in best:
            top = peer_best[best[name]]
            label += (", its best configuration" if full else f", its best of {sum(n.startswith(best[name] + '-') for n in subjects)} configurations"
                      ) + f" ({top['rps']:.0f} req/s at {top['clients']} clients)"
        if accelerated(name) and execution.get(name) == "eager":
            refused = str(((detail.get("runners") or {}).get(name, {}).get("accelerate") or {}).get("refused", ""))
            label += f" — refused at load ({'parity' if refused.startswith('parity') else 'see /models'}), eager served"
        lines.append(f"| {label} | " + " / ".join(f"{r.get('rps', 0):.0f}" for r in rows)
                     + f" | {rows[2].get('p50_ms') or 0:,.0f} / {rows[2].get('p99_ms') or 0:,.0f} ms | {rows[2].get('rps', 0) / eager32:.2f}× |")
    return "\n".join(lines)


#: How the long-text table names each robustness subject (bench/robustness.py).
LONG_TEXT_LABELS = {
    "windows": "service, `REGISTRY_LONG_TEXT=windows` (default: 2 lanes × 1 torch thread)",
    "windows-1-lane-2-threads": "service, `windows`, one lane of 2 torch threads",
    "truncate": "service, `REGISTRY_LONG_TEXT=truncate` (first window only)",
}


def long_text_markdown(results: dict[str, Any]) -> str:
    """The long-text throughput table from a results file (robustness area): per subject and traffic kind,
    texts/s and characters/s at 32 clients, and the mixed traffic's ratio to the raw model on the same windows."""
    detail = results["areas"]["robustness"]["detail"]
    raw = detail["raw_windows"]
    chars = raw["chars_per_text"]  # of the mixed traffic's texts
    throughput: dict[str, dict[str, list[dict[str, Any]]]] = detail["throughput"]

    def mean(kind: str, subject: str, field: str) -> float:
        rows = throughput[kind][subject]
        return sum(r.get(field) or 0 for r in rows) / len(rows)

    top = raw["best"]
    lines = ["| subject | short-only: texts/s, p99 | mixed-length: texts/s, p99 | mixed: characters submitted/s | "
             "vs the raw model on the same windows |",
             "|---|---|---|---|---|"]
    for subject in throughput["mixed"]:
        mixed_rps = mean("mixed", subject, "rps")
        ratio = f"{mixed_rps * chars / top['chars_per_s']:.2f}×" if subject != "truncate" else "– (reads less)"
        lines.append(f"| {LONG_TEXT_LABELS.get(subject, subject)} | {mean('short', subject, 'rps'):.0f}, "
                     f"{max(r.get('p99_ms') or 0 for r in throughput['short'][subject]):,.0f} ms | {mixed_rps:.0f}, "
                     f"{max(r.get('p99_ms') or 0 for r in throughput['mixed'][subject]):,.0f} ms | {mixed_rps * chars:,.0f} | {ratio} |")
    lines.append(f"| raw model on the mixed traffic's windows ({raw['windows']} model inputs of ≤ {raw['window']} tokens for {raw['texts']} "
                 f"texts; {top['threads']} torch thread(s), sorted batches of {top['batch']}, {top['lanes']} lane(s)) | | "
                 f"{top['texts_per_s']:.0f} | {top['chars_per_s']:,.0f} | 1.00× |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    # python -m bench.report [--full] [results.json]: the README's tables (Markdown) of that run, each area it holds
    args = [a for a in sys.argv[1:] if a != "--full"]
    path = Path(args[0]) if args else Path(__file__).resolve().parent / "results.json"
    results = json.loads(path.read_text())
    tables = {"hotpath": lambda: hotpath_markdown(results, full="--full" in sys.argv), "robustness": lambda: long_text_markdown(results)}
    needs = {"hotpath": "subjects", "robustness": "raw_windows"}  # a failed area, or a file from before its table, has none
    print("\n\n".join(render_table() for area, render_table in tables.items()
                        if needs[area] in (results["areas"].get(area, {}).get("detail") or {})))
