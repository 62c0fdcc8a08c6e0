"""The resolver chain against real Redis, MLflow (+ S3) and the reference training API."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest
import redis

from registry.errors import ModelNotResolvable
from registry.payload import RegistryPayload
from registry.resolver import Resolver
from registry.sources.mlflow_registry import MLflowRegistrySource
from tests.helpers import save_hf_dir, MisbehavingLayer, dead_url, publish_tiny, settings_for
from tests.servers import redis_server

pytestmark = pytest.mark.servers

MODEL = "chain"


def outcomes(resolution_or_error) -> list[tuple[str, str]]:
    return [(a.source, a.outcome.value) for a in resolution_or_error.trail]


@pytest.fixture(scope="module")
def published(mlflow_srv, tmp_path_factory):
    """Versions 1..3 of `chain` (f1 0.80, 0.90, 0.85): best = 2, latest = 3; alias champion = 1."""
    settings = settings_for(tmp_path_factory.mktemp("publish"), mlflow_uri=mlflow_srv.url)
    results = [publish_tiny(settings, MODEL, seed, f1) for seed, f1 in ((1, 0.80), (2, 0.90), (3, 0.85))]
    source = MLflowRegistrySource(mlflow_srv.url)
    source.client.set_registered_model_alias(f"security_{MODEL}", "champion", "1")
    return results


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf_dir(tmp_path_factory.mktemp("hf") / "pretrained", seed=99)


@pytest.fixture
def full_settings(tmp_path, redis_srv, training_api_srv, mlflow_srv, published, hf_dir, cache_key):
    return settings_for(
        tmp_path, redis_url=f"redis://127.0.0.1:{redis_srv.port}/0", cache_key=cache_key,
        training_api_url=training_api_srv.url, mlflow_uri=mlflow_srv.url, fallback={MODEL: str(hf_dir)},
    )


def test_each_layer_answers_in_turn(full_settings, redis_srv, tmp_path):
    settings = full_settings
    r = redis.Redis(port=redis_srv.port)

    # 1. cache empty -> the training API answers, and the record is written back to Redis and file.
    res = Resolver.from_settings(settings).resolve(MODEL, "latest")
    assert res.record.source == "training_api" and res.record.version == "3"
    assert outcomes(res) == [("redis", "miss"), ("training_api", "hit")]
    assert all(a.elapsed_ms > 0 for a in res.trail), "every layer asked reports how long it took"

    # 2. now Redis answers.
    res = Resolver.from_settings(settings).resolve(MODEL, "latest")
    assert res.record.source == "redis" and outcomes(res) == [("redis", "hit")]

    # 3. cache emptied and the training API stopped -> MLflow.
    r.delete(settings.cache_key)
    stopped_api = settings.model_copy(update={"training_api_url": dead_url()})
    res = Resolver.from_settings(stopped_api).resolve(MODEL, "latest")
    assert outcomes(res) == [("redis", "miss"), ("training_api", "unavailable"), ("mlflow", "hit")]
    assert res.record.version == "3" and res.record.sha256 and res.record.artifact_uri.startswith("s3://")

    # 4. MLflow down too -> the file backup (written back in step 1 and 3).
    r.delete(settings.cache_key)
    no_mlflow = stopped_api.model_copy(update={"mlflow_tracking_uri": dead_url()})
    res = Resolver.from_settings(no_mlflow).resolve(MODEL, "latest")
    assert outcomes(res)[-1] == ("file", "hit") and res.record.version == "3"
    assert outcomes(res)[2] == ("mlflow", "unavailable")
    assert r.get(settings.cache_key) is None, "a file hit is not promoted into the shared cache"

    # 5. backup gone -> the Hugging Face fallback.
    settings.backup_path.unlink()
    res = Resolver.from_settings(no_mlflow).resolve(MODEL, "latest")
    assert outcomes(res)[-2:] == [("file", "miss"), ("huggingface", "hit")]
    assert res.record.source == "huggingface" and res.record.artifact_uri == no_mlflow.fallback_models[MODEL]
    assert not settings.backup_path.exists(), "the fallback never writes registry data"

    # 6. no fallback either -> a clear error naming the model and every layer.
    nothing = no_mlflow.model_copy(update={"fallback_models": {}})
    with pytest.raises(ModelNotResolvable) as err:
        Resolver.from_settings(nothing).resolve(MODEL, "latest")
    message = str(err.value)
    assert repr(MODEL) in message
    for layer in ("redis: miss", "training_api: unavailable", "mlflow: unavailable", "file: miss"):
        assert layer in message
    assert outcomes(err.value) == [("redis", "miss"), ("training_api", "unavailable"), ("mlflow", "unavailable"), ("file", "miss")]


def test_write_back_value_ttl_and_atomic_file(full_settings, redis_srv, mlflow_srv):
    settings = full_settings.model_copy(update={"training_api_url": None, "cache_ttl": 1234})
    res = Resolver.from_settings(settings).resolve(MODEL, "best")
    assert res.record.source == "mlflow" and res.record.version == "2"

    r = redis.Redis(port=redis_srv.port)
    assert 1230 <= r.ttl(settings.cache_key) <= 1234
    cached = RegistryPayload.parse(r.get(settings.cache_key), "test").section(MODEL, source="t")
    assert [v.version for v in cached.versions] == ["1", "2", "3"]
    assert cached.best.version == "2" and cached.latest.version == "3"

    on_disk = json.loads(settings.backup_path.read_text())
    assert on_disk["best_models"][MODEL]["version"] == "2"
    assert set(on_disk) >= {"latest_models", "best_models", "versions", "timestamp"}
    leftovers = [p.name for p in settings.backup_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_default_ttl_is_one_hour(full_settings, redis_srv):
    settings = full_settings.model_copy(update={"training_api_url": None})
    assert settings.cache_ttl == 3600
    Resolver.from_settings(settings).resolve(MODEL, "latest")
    assert 3590 <= redis.Redis(port=redis_srv.port).ttl(settings.cache_key) <= 3600


@pytest.mark.parametrize(("selector", "version", "answered_by"), [
    ("latest", "3", "training_api"),
    ("best", "2", "training_api"),
    ("2", "2", "training_api"),
    ("champion", "1", "mlflow"),
])
def test_selectors(full_settings, selector, version, answered_by):
    res = Resolver.from_settings(full_settings).resolve(MODEL, selector)
    assert res.record.version == version
    assert res.record.source == answered_by
    if selector == "champion":
        # custom aliases are not answered from cached payloads: they may have moved since
        assert outcomes(res) == [("redis", "miss"), ("training_api", "miss"), ("mlflow", "hit")]
        assert all(a.detail == "custom aliases are answered by MLflow" for a in res.trail[:2])
        assert "champion" in res.record.aliases
    # the second resolution is a cache hit, except for custom aliases
    again = Resolver.from_settings(full_settings).resolve(MODEL, selector)
    assert again.record.version == version
    assert again.record.source == ("mlflow" if selector == "champion" else "redis")


def test_unknown_version_is_not_answered_by_the_fallback(full_settings):
    with pytest.raises(ModelNotResolvable) as err:
        Resolver.from_settings(full_settings).resolve(MODEL, "42")
    assert outcomes(err.value)[-1] == ("huggingface", "miss")


def test_file_backup_answers_pinned_alias_when_mlflow_is_down(full_settings):
    Resolver.from_settings(full_settings).resolve(MODEL, "champion")  # writes the backup
    down = full_settings.model_copy(update={"redis_url": None, "training_api_url": None, "mlflow_tracking_uri": dead_url()})
    res = Resolver.from_settings(down).resolve(MODEL, "champion")
    assert res.record.source == "file" and res.record.version == "1"


def resolve_while_paused(server, settings):
    """Resolve `latest` while `server` is stopped with SIGSTOP (it accepts connections, never answers)."""
    server.pause()
    try:
        start = time.monotonic()
        res = Resolver.from_settings(settings).resolve(MODEL, "latest")
        return res, time.monotonic() - start
    finally:
        server.resume()


def test_hanging_training_api_is_bounded_by_its_timeout(full_settings, training_api_srv):
    res, elapsed = resolve_while_paused(training_api_srv, full_settings)
    assert outcomes(res)[:3] == [("redis", "miss"), ("training_api", "unavailable"), ("mlflow", "hit")]
    assert "Timeout" in res.trail[1].detail
    assert elapsed < 8, f"a hanging layer held the resolution for {elapsed:.1f}s"


def test_hanging_mlflow_is_bounded_by_its_timeout(full_settings, mlflow_srv):
    Resolver.from_settings(full_settings.model_copy(update={"redis_url": None, "training_api_url": None})).resolve(MODEL, "latest")
    res, elapsed = resolve_while_paused(mlflow_srv, full_settings.model_copy(update={"training_api_url": None}))
    assert outcomes(res) == [("redis", "miss"), ("mlflow", "unavailable"), ("file", "hit")]
    assert elapsed < 10, f"a hanging MLflow held the resolution for {elapsed:.1f}s"


def test_hanging_and_restarted_redis(tmp_path, server_logs, mlflow_srv, published):
    own = redis_server(server_logs).start()
    try:
        settings = settings_for(tmp_path, redis_url=f"redis://127.0.0.1:{own.port}/0", mlflow_uri=mlflow_srv.url)
        resolver = Resolver.from_settings(settings)
        assert resolver.resolve(MODEL, "latest").record.source == "mlflow"
        assert resolver.resolve(MODEL, "latest").record.source == "redis"

        own.pause()
        start = time.monotonic()
        res = resolver.resolve(MODEL, "latest")
        assert time.monotonic() - start < 5
        assert outcomes(res)[:2] == [("redis", "unavailable"), ("mlflow", "hit")]
        own.resume()

        own.stop()
        res = resolver.resolve(MODEL, "latest")
        assert outcomes(res)[:2] == [("redis", "unavailable"), ("mlflow", "hit")]
        own.start()  # empty after a restart; the same resolver reconnects by itself
        assert resolver.resolve(MODEL, "latest").record.source == "mlflow"
        assert resolver.resolve(MODEL, "latest").record.source == "redis"
    finally:
        own.stop()


@pytest.mark.parametrize(("status", "body", "outcome", "detail"), [
    (500, b'{"error": "boom"}', "unavailable", "HTTP 500"),
    (200, b"<html>not json", "rejected", "not valid JSON"),
    (200, b'["a", "list"]', "rejected", "expected a JSON object"),
    (200, b'{"models": {}}', "rejected", "missing 'latest_models'"),
    (200, b'{"latest_models": {"chain": {"name": "chain", "version": "three", "model_uri": "x"}}}', "rejected", "positive integer"),
    (200, b'{"latest_models": {"chain": {"name": "chain", "version": "1"}}}', "rejected", "model_uri"),
])
def test_misbehaving_training_api(full_settings, status, body, outcome, detail, caplog):
    layer = MisbehavingLayer()
    layer.status, layer.body = status, body
    with layer.running():
        settings = full_settings.model_copy(update={"training_api_url": layer.url})
        with caplog.at_level(logging.WARNING):
            res = Resolver.from_settings(settings).resolve(MODEL, "latest")
    assert outcomes(res)[:3] == [("redis", "miss"), ("training_api", outcome), ("mlflow", "hit")]
    assert detail in res.trail[1].detail
    assert any("training_api" in rec.getMessage() and detail in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("value", [
    b"\xff\xfe garbage",
    b"{truncated",
    b'{"latest_models": []}',
    b'{"latest_models": {"chain": {"name": "chain", "version": "2", "model_uri": "m", "sha256": "nothex"}}}',
    b'{"latest_models": {"chain": {"name": "other", "version": "2", "model_uri": "m"}}}',
])
def test_poisoned_cache_is_rejected_and_next_layer_asked(full_settings, redis_srv, value):
    redis.Redis(port=redis_srv.port).set(full_settings.cache_key, value)
    res = Resolver.from_settings(full_settings).resolve(MODEL, "latest")
    assert outcomes(res)[:2] == [("redis", "rejected"), ("training_api", "hit")]
    # the write-back replaced the poisoned value with the registry's data
    assert Resolver.from_settings(full_settings).resolve(MODEL, "latest").record.source == "redis"


@pytest.mark.parametrize(("content", "quarantined"), [
    (b"", True), (b"{not json", True), (b"null", True),
    (b'{"latest_models": {"chain": 7}}', False),  # readable payload, broken model: that model is replaced
])
def test_corrupt_backup_is_rejected_then_replaced(full_settings, hf_dir, content, quarantined):
    full_settings.backup_path.parent.mkdir(parents=True, exist_ok=True)
    full_settings.backup_path.write_bytes(content)
    down = full_settings.model_copy(update={"redis_url": None, "training_api_url": None, "mlflow_tracking_uri": dead_url()})
    res = Resolver.from_settings(down).resolve(MODEL, "latest")
    assert outcomes(res)[-2:] == [("file", "rejected"), ("huggingface", "hit")]

    # the next registry answer rewrites the file and keeps the corrupt one aside (nothing lost)
    Resolver.from_settings(full_settings.model_copy(update={"redis_url": None, "training_api_url": None})).resolve(MODEL, "latest")
    assert json.loads(full_settings.backup_path.read_text())["latest_models"][MODEL]["version"] == "3"
    kept = [p for p in full_settings.backup_path.parent.iterdir() if ".corrupt-" in p.name]
    assert [p.read_bytes() for p in kept] == ([content] if quarantined else [])


def test_missing_backup_is_a_miss(full_settings):
    down = full_settings.model_copy(update={"redis_url": None, "training_api_url": None, "mlflow_tracking_uri": dead_url(), "fallback_models": {}})
    with pytest.raises(ModelNotResolvable) as err:
        Resolver.from_settings(down).resolve(MODEL, "latest")
    assert outcomes(err.value) == [("mlflow", "unavailable"), ("file", "miss")]


def test_unregistered_model_is_a_miss_everywhere(full_settings):
    with pytest.raises(ModelNotResolvable) as err:
        Resolver.from_settings(full_settings).resolve("never_registered", "latest")
    assert outcomes(err.value) == [("redis", "miss"), ("training_api", "miss"), ("mlflow", "miss"), ("file", "miss"), ("huggingface", "miss")]
    assert "'never_registered'" in str(err.value)


def test_health_reports_each_layer(full_settings, redis_srv):
    Resolver.from_settings(full_settings).resolve(MODEL, "latest")
    layers = {h.source: h for h in Resolver.from_settings(full_settings).health([MODEL])}
    assert list(layers) == ["redis", "training_api", "mlflow", "file", "huggingface"]
    assert all(h.reachable for h in layers.values())
    assert all(layers[name].latency_ms > 0 for name in ("redis", "training_api", "mlflow", "file")), "each asked layer is timed"
    assert layers["mlflow"].models[MODEL] == {"present": True, "latest": "3", "best": "2", "versions": ["1", "2", "3"]}
    assert layers["redis"].models[MODEL]["latest"] == "3"
    assert layers["file"].models[MODEL]["best"] == "2"

    down = full_settings.model_copy(update={"training_api_url": dead_url(), "mlflow_tracking_uri": dead_url()})
    layers = {h.source: h for h in Resolver.from_settings(down).health([MODEL])}
    assert not layers["training_api"].reachable and not layers["mlflow"].reachable
    assert layers["redis"].reachable


def test_failing_layer_is_logged_once(full_settings, caplog):
    settings = full_settings.model_copy(update={"redis_url": None, "training_api_url": dead_url()})
    resolver = Resolver.from_settings(settings)
    with caplog.at_level(logging.DEBUG, logger="registry"):
        for _ in range(3):
            resolver.resolve(MODEL, "latest")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "training_api" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "[HYBRID]" in r.getMessage()]
    assert len(infos) == 3 and "from mlflow" in infos[0]


def test_training_api_serves_the_payload(training_api_srv, published):
    response = httpx.get(f"{training_api_srv.url}/models/latest", timeout=10)
    assert response.status_code == 200
    payload = RegistryPayload.parse(response.content, "api")
    assert payload.section(MODEL, source="t").latest.version == "3"
    assert response.headers["X-Registry-Source"] in ("redis", "mlflow")
    health = httpx.get(f"{training_api_srv.url}/health", timeout=10).json()
    assert health["status"] == "ok" and {layer["source"] for layer in health["layers"]} == {"redis", "mlflow", "file"}
