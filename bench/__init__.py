"""Benchmarks side by side: each figure beside its baseline, measured in the same run (issue 5).

    make bench                       # = .venv/bin/python -m bench
    python -m bench --quick          # a smoke run of every area, a few minutes
    python -m bench --only resolution,hotpath

Areas, one module each: `resolution` (per registry layer, beside a bare Redis GET and an HTTP round
trip), `hotpath` (classify throughput and latency beside the raw model and `mlflow models serve`),
`reload`, `coldstart`, `scale` (registry size, workers). Shared servers live in `lab.py`, the load
generator in `load.py`, tables and statistics in `report.py`.

Timings on shared machines are noisy: the suite reports medians and ratios, and never asserts on a
time. It only talks to loopback and stops every process it starts.
"""
