"""The bench's targets: a figure of a form the service refused is "refused", never met or missed."""

from __future__ import annotations

from bench.__main__ import evaluate, render_targets
from bench.report import AreaReport


def _rows(report: AreaReport) -> dict[str, dict[str, object]]:
    return {str(row["key"]): row for row in evaluate({"hotpath": report})}


def test_a_refused_form_is_reported_refused_with_why_not_as_a_ratio_of_eager_against_eager():
    report = AreaReport("hotpath", "t")
    why = "parity: 5 of 102 labels differ from eager on the gate set"
    report.add("int8 throughput, 32 clients", 40.0, "req/s", "service, eager", 42.0, key="accel_vs_eager_32", refused=why)
    report.add("int8 labels differing", 0.0, "count", key="accel_label_mismatches", refused=why)
    report.add("service vs ceiling", 45.0, "req/s", "raw", 50.0, key="svc_vs_ceiling_32")
    rows = _rows(report)

    assert rows["accel_vs_eager_32"]["status"] == "refused" and rows["accel_vs_eager_32"]["refused"] == why
    assert rows["accel_label_mismatches"]["status"] == "refused"  # not "met" by the eager model agreeing with itself
    assert rows["svc_vs_ceiling_32"]["status"] == "met" and "refused" not in rows["svc_vs_ceiling_32"]
    assert rows["redis"]["status"] == "not measured"
    assert f"refused on this machine: {why}" in render_targets(list(rows.values()))


def test_a_form_that_served_is_judged_on_its_ratio():
    report = AreaReport("hotpath", "t")
    report.add("int8 throughput, 32 clients", 84.0, "req/s", "service, eager", 42.0, key="accel_vs_eager_32")
    assert _rows(report)["accel_vs_eager_32"]["status"] == "met"
    report.figures[0].value = 50.0
    assert _rows(report)["accel_vs_eager_32"]["status"] == "not met"
