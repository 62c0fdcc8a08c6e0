"""`python -m bench [--quick] [--only AREA,...] [--out PATH]`: run the areas, print tables, write JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bench.report import AreaReport, machine_info, render
from registry.settings import ACCELERATIONS

AREAS = ("resolution", "hotpath", "reload", "coldstart", "scale", "follow", "robustness")
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


@dataclass(frozen=True)
class Target:
    """One target of issue 5, read from a figure's ratio (or value)."""

    text: str
    area: str
    key: str
    check: Callable[[float], bool]
    use: str = "ratio"  # or "value"


TARGETS = (
    Target("service throughput at 32 clients >= 0.9 x honest raw ceiling "
           "(the same windows, any batching the service uses at 32 clients, threads 1-2, lanes; "
           "its best configurations measured right before and after the service)", "hotpath",
           "svc_vs_ceiling_32", lambda r: r >= 0.9),
    Target("service throughput at 32 clients >= 2 x mlflow models serve", "hotpath", "svc_vs_mlflow_32", lambda r: r >= 2.0),
    Target("service throughput at 32 clients >= 1.5 x MLServer's best (HF runtime, adaptive batching, threads 1-2 x workers 0-2)",
           "hotpath", "svc_vs_mlserver_32", lambda r: r >= 1.5),
    # issue 19: an accelerated path well past int8
    Target(f"fastest REGISTRY_ACCELERATE ({', '.join(ACCELERATIONS)}) >= 2.5 x eager at 32 clients", "hotpath",
           "accel_best_vs_eager_32", lambda r: r >= 2.5),
    Target("fastest acceleration's labels identical to eager on the gate set and the mix", "hotpath", "accel_best_label_mismatches",
           lambda v: v == 0, "value"),
    Target("REGISTRY_ACCELERATE=int8 >= 1.8 x eager at 32 clients", "hotpath", "accel_vs_eager_32", lambda r: r >= 1.8),
    Target("REGISTRY_ACCELERATE=int8 labels identical to eager on the mix", "hotpath", "accel_label_mismatches",
           lambda v: v == 0, "value"),
    Target("service p99 at 32 clients <= 2 x its p50", "hotpath", "svc_p99_over_p50_32", lambda r: r <= 2.0),
    Target("zero non-200 answers (or errors) from the service at 32 clients", "hotpath", "svc_bad_32", lambda v: v == 0, "value"),
    Target("zero non-200 answers (or errors) from the service at 8 clients", "hotpath", "svc_bad_8", lambda v: v == 0, "value"),
    Target("Redis-cache resolution within 2 x a bare Redis GET", "resolution", "redis", lambda r: r <= 2.0),
    Target("repeated in-process resolution in microseconds (< 100 µs)", "resolution", "exact_repeat", lambda v: v < 0.1, "value"),
    Target("reload (POST to new version answering) within 1.2 x raw load", "reload", "reload_idle", lambda r: r <= 1.2),
    Target("classify p99 during a reload within 2 x steady p99", "reload", "p99_during_reload", lambda r: r <= 2.0),
    Target("zero non-200 answers during reloads", "reload", "bad_during_reload", lambda v: v == 0, "value"),
    Target("seed design: Redis cache hit under 1 ms", "resolution", "redis_seed", lambda v: v < 1.0, "value"),
    Target("seed design: MLflow resolution under 100-500 ms (aim far below)", "resolution", "mlflow_seed", lambda v: v < 100.0, "value"),
    Target("seed design: file resolution under 10-50 ms (aim far below)", "resolution", "file_seed", lambda v: v < 10.0, "value"),
    Target("alias move to every replica by webhook within the raw load + 1 s (max)", "follow", "webhook_slack", lambda r: r <= 1.0),
    Target("MLflow polls per interval do not grow with replicas (N=2 within 1.2 x N=1)", "follow", "polls_growth", lambda r: r <= 1.2),
    # issue 15: length robustness (REGISTRY_LONG_TEXT=windows, the default)
    Target("recall on held-out injections at every length (0-20 sentences before, past 512 tokens, first of a long text) "
           "within 0.05 of recall on bare injections", "robustness", "recall_gap_windows", lambda v: v <= 0.05, "value"),
    Target("false-positive rate on longer held-out benign texts no higher than on short ones", "robustness",
           "fpr_excess_windows", lambda v: v <= 0.0, "value"),
    Target("short-text throughput at 32 clients, windows >= 0.97 x truncate", "robustness", "short_rps_windows_vs_truncate",
           lambda r: r >= 0.97),
    Target("zero non-200 answers (or errors) at 32 clients, windows and truncate, short and mixed traffic", "robustness", "bad_32",
           lambda v: v == 0, "value"),
    # issue 19: long texts at the model's own speed
    Target("mixed-length traffic at 32 clients, windows, >= 0.9 x the raw model on the same windows (characters/s)", "robustness",
           "mixed_chars_vs_raw_windows", lambda r: r >= 0.9),
)

#: Variables of the user's shell that would leak into the measured configuration.
SCRUBBED_PREFIXES = ("REGISTRY_",)
SCRUBBED = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL")


def evaluate(reports: dict[str, AreaReport]) -> list[dict[str, object]]:
    out = []
    for t in TARGETS:
        report = reports.get(t.area)
        fig = report.get(t.key) if report else None
        measured = None if fig is None else (fig.ratio if t.use == "ratio" else fig.value)
        refused = fig.refused if fig is not None else ""  # the figure measured the eager model standing in
        status = ("refused" if refused else "not measured" if measured is None else "met" if t.check(measured) else "not met")
        out.append({"target": t.text, "area": t.area, "figure": t.key, "key": t.key,
                    "value": None if fig is None or fig.value is None else round(fig.value, 4),
                    "baseline": None if fig is None or fig.baseline is None else round(fig.baseline, 4),
                    "baseline_name": None if fig is None else fig.baseline_name,
                    "ratio": None if fig is None or fig.ratio is None else round(fig.ratio, 4),
                    "measured": None if measured is None else round(measured, 4), "as": t.use, "status": status,
                    **({"refused": refused} if refused else {})})
    return out


def cross_area(reports: dict[str, AreaReport]) -> list[dict[str, object]]:
    """Ratios between areas of this run: the service with 2 workers (scale) against the hot path's baselines."""
    hot, scale = reports.get("hotpath"), reports.get("scale")
    two = scale.get("workers_rps") if scale else None
    out: list[dict[str, object]] = []
    if hot is None or two is None or two.value is None:
        return out
    for key, text in (("raw_ceiling", "raw in-process ceiling"), ("svc_rps_vs_mlflow_32", "mlflow models serve at 32 clients")):
        fig = hot.get(key)
        base = None if fig is None else (fig.value if key == "raw_ceiling" else fig.baseline)
        if base:
            out.append({"figure": f"REGISTRY_WORKERS=2 throughput at 32 clients (scale) vs {text} (hotpath)",
                        "value": round(two.value, 2), "baseline": round(base, 2), "ratio": round(two.value / base, 3)})
    return out


def render_targets(rows: list[dict[str, object]]) -> str:
    lines = ["== targets (issue 5), ratios from this run =="]
    for row in rows:
        measured = row["measured"]
        shown = "-" if measured is None else (f"{measured:.2f}x" if row["as"] == "ratio" else f"{measured:g}")
        why = f"; refused on this machine: {row['refused']}" if row.get("refused") else ""
        lines.append(f"  [{str(row['status']).upper():>12}] {row['target']}  (measured {shown}{why})")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmarks of the service, each beside its baseline.")
    parser.add_argument("--quick", action="store_true", help="short durations and fewer repeats: a smoke run of a few minutes")
    parser.add_argument("--only", default=",".join(AREAS), help=f"comma-separated areas to run, from: {', '.join(AREAS)}")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON results file (default {DEFAULT_OUT}; --quick: results-quick.json)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop everything after this long (default 45, --quick 20)")
    args = parser.parse_args(argv)
    areas = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in areas if a not in AREAS]
    if unknown:
        parser.error(f"unknown area(s) {', '.join(unknown)}; choose from {', '.join(AREAS)}")
    args.areas = [a for a in AREAS if a in areas]
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("results-quick.json") if args.quick else DEFAULT_OUT
    if args.max_minutes is None:
        args.max_minutes = 20.0 if args.quick else 45.0
    return args


def say(text: str) -> None:
    print(text, flush=True)


def prepare_environment() -> list[str]:
    """Quiet, offline, and free of the caller's registry configuration (reported, not silently dropped)."""
    from tests.servers import QUIET_ENV

    dropped = sorted(k for k in os.environ if k.startswith(SCRUBBED_PREFIXES) or k in SCRUBBED)
    for key in dropped:
        del os.environ[key]
    os.environ.update(QUIET_ENV)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return dropped


def install_stops(max_minutes: float) -> None:
    """SIGTERM and the overall time limit both unwind through the `finally` that stops every server."""

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)

    def expire() -> None:
        say(f"[bench] time limit of {max_minutes:g} min reached: stopping")
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(max_minutes * 60, expire)
    timer.daemon = True
    timer.start()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    dropped = prepare_environment()
    install_stops(args.max_minutes)

    from bench.lab import DATA, Lab, reset_dir

    machine = machine_info()
    say(f"[bench] machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
        f"load average {machine['loadavg_at_start']}; torch {machine.get('torch')}, bentoml {machine.get('bentoml')}, "
        f"mlflow {machine.get('mlflow')}")
    code = machine["code"]
    say(f"[bench] code: commit {code['commit']}" + (f", modified: {', '.join(code['modified'])}" if code["modified"] else ", clean"))
    say(f"[bench] areas: {', '.join(args.areas)}{' (quick)' if args.quick else ''}; results -> {args.out}")
    if dropped:
        say(f"[bench] ignoring these variables of the calling shell: {', '.join(dropped)}")
    run_dir = reset_dir(DATA / ("run-quick" if args.quick else "run"))
    lab = Lab(run_dir, say=say)
    reports: dict[str, AreaReport] = {}
    started = time.perf_counter()
    interrupted = None
    try:
        for area in args.areas:
            say(f"[bench] {area} ...")
            t0 = time.perf_counter()
            load_before = [round(x, 2) for x in os.getloadavg()]
            try:
                module = importlib.import_module(f"bench.{area}")
                report = module.run(lab, args.quick)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one area failing still leaves the others' figures
                report = AreaReport(area, "failed", error=f"{type(exc).__name__}: {exc}")
                report.detail["traceback"] = traceback.format_exc()
                say(report.detail["traceback"])
            report.seconds = time.perf_counter() - t0
            report.loadavg = (load_before, [round(x, 2) for x in os.getloadavg()])
            reports[area] = report
            say(render(report) + "\n")
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "interrupted"
        say(f"[bench] interrupted ({interrupted}); stopping servers")
    finally:
        lab.close()

    targets = evaluate(reports)
    total = time.perf_counter() - started
    say(f"== all areas ({total / 60:.1f} min) ==")
    for report in reports.values():
        say(render(report) + "\n")
    say(render_targets(targets))
    derived = cross_area(reports)
    if derived:
        say("== across areas (same run, measured minutes apart) ==")
        for row in derived:
            say(f"  {row['figure']}: {row['value']} vs {row['baseline']} req/s = {row['ratio']:.2f}x")
    say(f"[bench] server logs in {lab.log_dir}")
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "machine": machine,
        "run": {"quick": args.quick, "areas": args.areas, "seconds": round(total, 1), "interrupted": interrupted,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - total)), "argv": sys.argv[1:]},
        "areas": {name: r.to_dict() for name, r in reports.items()},
        "targets": targets,
        "across_areas": derived,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    say(f"[bench] wrote {args.out}")
    failed = [r.area for r in reports.values() if r.error]
    return 1 if interrupted or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
