"""`python -m bench.plots [RESULTS.json] [--out DIR]`: the docs' benchmark plots, drawn from a results file.

Reads what `python -m bench` wrote (default: bench/reference-hotpath.json, the run the docs quote)
and writes PNGs into docs/img/: throughput and latency per subject of the hot path, and, when
the run has them, the robustness area's recall by where the injection sits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "reference-hotpath.json"
DEFAULT_OUT = HERE.parent / "docs" / "img"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def hotpath_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Requests/s at each client count per subject (the raw ceiling as a line), and p50/p99 at the highest."""
    area = results.get("areas", {}).get("hotpath") or {}
    subjects: dict[str, dict[str, dict[str, Any]]] = (area.get("detail") or {}).get("subjects") or {}
    if not subjects:
        return []
    subjects = _best_peer_configurations(subjects, area["detail"].get("peer_best") or {})
    plt = _pyplot()
    levels = sorted({int(level) for runs in subjects.values() for level in runs})
    ceiling = next((f["value"] for f in area.get("figures", []) if f.get("key") == "raw_ceiling"), None)
    written = []

    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(subjects)
    for i, (name, runs) in enumerate(subjects.items()):
        xs = [j + i * width for j in range(len(levels))]
        ax.bar(xs, [runs.get(str(level), {}).get("rps", 0) for level in levels], width, label=name)
    if ceiling:
        ax.axhline(ceiling, color="black", linestyle="--", linewidth=1, label=f"eager raw model ceiling ({ceiling:.0f}/s)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], [f"{level} clients" for level in levels])
    ax.set_ylabel("requests/s (one text each)")
    ax.set_title("Hot path: throughput by concurrency")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    written.append(_save(fig, out / "hotpath_throughput.png"))

    top = str(levels[-1])
    names = [n for n, runs in subjects.items() if top in runs]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], [subjects[n][top]["p50_ms"] for n in names], 0.4, label="p50")
    ax.barh([y - 0.2 for y in ys], [subjects[n][top]["p99_ms"] for n in names], 0.4, label="p99")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds")
    ax.set_title(f"Hot path: latency at {top} clients")
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out / "hotpath_latency.png"))
    plt.close("all")
    return written


def _best_peer_configurations(subjects: dict[str, dict[str, dict[str, Any]]],
                               peer_best: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The subjects with each peer measured in several configurations (`mlserver-t2-w1`, ...) reduced to the
    best the run found (bench/hotpath.py's `peer_best`: family -> its best configuration's name)."""
    best = {v["config"] for v in peer_best.values()}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, runs in subjects.items():
        family = next((f for f in peer_best if name.startswith(f + "-")), None)
        if family is None:
            out[name] = runs
        elif name in best:
            out[f"{family} (best: {name.removeprefix(family + '-')})"] = runs
    return out


def robustness_plot(results: dict[str, Any], out: Path) -> Optional[Path]:
    """Recall by the injection's position per reading mode, from the robustness area's `recall` detail."""
    area = results.get("areas", {}).get("robustness") or {}
    table = (area.get("detail") or {}).get("recall")  # {mode: {position: recall}}
    if not isinstance(table, dict) or not table:
        return None
    plt = _pyplot()
    positions = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for mode, row in table.items():
        ax.plot(positions, [row.get(p) for p in positions], marker="o", label=mode)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall on held-out injections")
    ax.set_title("Long texts: recall by where the injection sits")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    path = _save(fig, out / "robustness_recall.png")
    plt.close("all")
    return path


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    written = hotpath_plots(results, args.out)
    robustness = robustness_plot(results, args.out)
    for path in written + ([robustness] if robustness else []):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
