"""Prometheus metrics on BentoML's /metrics, merged across two workers, moving as the registry does."""

from __future__ import annotations

import json
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import dead_url, publish_tiny, service_env, settings_for, wait_for
from tests.service_proc import ServiceProcess

pytestmark = [pytest.mark.servers, pytest.mark.e2e, pytest.mark.slow]


def scrape(service: ServiceProcess) -> list[tuple[str, dict[str, str], float]]:
    response = service.client.get("/metrics")
    assert response.status_code == 200
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(response.text) for s in family.samples]


def total(samples, name: str, **labels: str) -> float:
    return sum(v for n, tags, v in samples if n == name and all(tags.get(k) == want for k, want in labels.items()))


def test_metrics_move_with_resolutions_reloads_and_a_failing_layer(tmp_path, server_logs, mlflow_srv, s3_srv):
    model = f"metrics_{uuid.uuid4().hex[:6]}"
    settings = settings_for(tmp_path / "publisher", mlflow_uri=mlflow_srv.url)
    for seed, version in ((41, "1"), (42, "2")):
        assert publish_tiny(settings, model, seed, f1=0.6).record.version == version
    service = ServiceProcess(server_logs, {
        **service_env(tmp_path, mlflow_srv, s3_srv, REGISTRY_MODELS=model),
        "REGISTRY_TRAINING_API_URL": dead_url(),  # a layer that always fails
        "REGISTRY_BREAKER_FAILURES": "2",
        "REGISTRY_POLL_INTERVAL": "600",
        "REGISTRY_LOG_FORMAT": "json",
        "REGISTRY_TRACE_CLASSIFY": "true",  # /classify through OpenTelemetry, as every other route
    }, workers=2).start()
    try:
        service.wait_ready()
        # Both workers serve version 2: one series per worker (pid) at 1.
        before = wait_for(lambda: (s := scrape(service)) and
                          sum(1 for n, tags, v in s if n == "registry_model_info" and tags["version"] == "2" and v == 1) == 2 and s,
                          30, "both workers to report version 2 in registry_model_info")
        assert total(before, "registry_resolutions_total", model=model, layer="training_api", outcome="unavailable") >= 2
        assert total(before, "registry_resolutions_total", model=model, layer="mlflow", outcome="hit") >= 2
        assert total(before, "registry_layer_duration_seconds_count", layer="mlflow") >= 2
        assert total(before, "registry_reloads_total", model=model, trigger="startup", outcome="ok") == 2
        assert total(before, "registry_model_load_seconds_count", model=model) == 2
        assert total(before, "registry_cache_writes_total", target="file", outcome="ok") >= 1
        assert total(before, "registry_circuit_open", layer="training_api") == 0  # one failure per worker: below 2
        traced = service.classify(["traced"])  # REGISTRY_TRACE_CLASSIFY=true: BentoML's request id, from its span
        assert traced.status_code == 200 and traced.headers.get("x-bentoml-request-id"), dict(traced.headers)

        response = service.reload(model=model, version="1")
        assert response.status_code == 200 and response.json()["workers"]["acknowledged"] == 2, response.text
        after = scrape(service)
        assert total(after, "registry_reloads_total", model=model, trigger="reload", outcome="ok") == 1
        assert total(after, "registry_reloads_total", model=model, trigger="bus", outcome="ok") == 1
        assert total(after, "registry_model_load_seconds_count", model=model) == 4
        info = {(tags["version"], v) for n, tags, v in after if n == "registry_model_info" and tags["model"] == model}
        assert ("1", 1.0) in info and ("2", 0.0) in info and ("2", 1.0) not in info, info
        assert total(after, "registry_resolutions_total", model=model, layer="training_api", outcome="unavailable") > \
            total(before, "registry_resolutions_total", model=model, layer="training_api", outcome="unavailable")

        # The reload's resolutions were each worker's second failure of the training API: its breaker opened.
        assert total(after, "registry_circuit_open", layer="training_api") == 1
        assert service.reload(model=model, alias="latest").status_code == 200  # an open layer is skipped, not waited for
        tripped = scrape(service)
        assert total(tripped, "registry_circuit_open", layer="training_api") == 1
        assert total(tripped, "registry_resolutions_total", model=model, layer="mlflow", outcome="hit") > \
            total(after, "registry_resolutions_total", model=model, layer="mlflow", outcome="hit")

        # REGISTRY_LOG_FORMAT=json: the project's lines are JSON objects with the tag and the fields.
        lines = [json.loads(line) for line in service.log_path.read_text().splitlines() if line.startswith('{"time"')]
        chosen = [line for line in lines if line["tag"] == "HYBRID" and line["model"] == model and line["layer"] == "mlflow"]
        assert chosen and chosen[0]["version"] in ("1", "2") and chosen[0]["level"] == "INFO", lines[:5]
        assert any(line["tag"] == "HYBRID" and line["layer"] == "training_api" and line["level"] == "WARNING" for line in lines)
    finally:
        service.stop()
