"""The admin surface in-process: errors carry their status, every error is JSON, the wiring fails loudly."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import bentoml
import pytest
from starlette.testclient import TestClient

from registry.coordination import CoordinationError
from registry.errors import (ArtifactError, GateRefused, ModelNotLoaded, ModelNotResolvable, ReloadFailed, SelectorError,
                             SettingsError, SourceUnavailable, UnknownModel)
from registry.logs import JSONFormatter, log_fields
from registry.record import LayerAttempt, Outcome
from serving.admin import error_response, hosts_ready, registry_admin, stop_hosts
from serving.host import ModelHost
from tests.helpers import save_hf_dir

TOKEN = "unit-token"


def test_each_error_carries_its_status_and_error_response_is_the_one_mapping():
    trail = [LayerAttempt("mlflow", Outcome.MISS, 1.0)]
    unresolved = ModelNotResolvable("m", "7", trail)
    try:
        raise ReloadFailed("m", str(unresolved)) from unresolved
    except ReloadFailed as exc:
        not_found = exc
    cases = [(UnknownModel("x", ["m"]), 404), (ModelNotLoaded("m", "loading"), 503), (ReloadFailed("m", "bad"), 422),
             (GateRefused("m", "2", {"reason": "accuracy"}), 422), (unresolved, 404), (not_found, 404),
             (SelectorError("v1", "reserved"), 400), (SettingsError("REGISTRY_X", 1, "bad"), 500),
             (CoordinationError("bus down"), 503), (SourceUnavailable("redis", "down"), 503), (ArtifactError("s3://a", "gone"), 422)]
    for exc, status in cases:
        response = error_response(exc)
        body = json.loads(response.body)
        assert (type(exc).__name__, exc.status, response.status_code) == (type(exc).__name__, status, status)
        assert body["error"].endswith(str(exc)), body
    assert json.loads(error_response(not_found).body)["trail"] == [trail[0].to_dict()]
    assert json.loads(error_response(GateRefused("m", "2", {"reason": "acc"})).body)["gate"] == {"reason": "acc"}
    assert json.loads(error_response(CoordinationError("x")).body)["error"] == "reload coordination failed: x"
    crashed = error_response(KeyError("secret-looking"))
    assert crashed.status_code == 500 and "KeyError" in json.loads(crashed.body)["error"]


def test_registry_admin_below_bentoml_service_is_an_error():
    class Plain:
        host = ModelHost(models=["m"])

    with pytest.raises(TypeError, match="above @bentoml.service"):
        registry_admin(Plain)
    with pytest.raises(TypeError, match="above @bentoml.service"):
        bentoml.service(registry_admin(json_routes=("/x",))(Plain))


def set_fallback_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A service that loads at once: no registry, the pretrained fallback for model `m`."""
    import os

    for key in [k for k in os.environ if k.startswith("REGISTRY_") or k == "MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv(key)
    directory = save_hf_dir(tmp_path / "hf", seed=3)
    monkeypatch.setenv("REGISTRY_MODELS", "m")
    monkeypatch.setenv("REGISTRY_FALLBACK_MODELS", json.dumps({"m": str(directory)}))
    monkeypatch.setenv("REGISTRY_BACKUP_PATH", str(tmp_path / "backup.json"))
    monkeypatch.setenv("REGISTRY_ARTIFACT_CACHE", str(tmp_path / "artifacts"))
    monkeypatch.setenv("REGISTRY_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("REGISTRY_RELOAD_DIR", str(tmp_path / "bus"))
    monkeypatch.setenv("REGISTRY_FOLLOW", "false")
    return directory


@pytest.fixture
def fallback_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return set_fallback_env(tmp_path, monkeypatch)


def wait_ready(client: TestClient, want: int = 200) -> Any:
    from tests.helpers import wait_for

    return wait_for(lambda: (r := client.get("/readyz")).status_code == want and r, 60, f"/readyz to answer {want}", poll=0.1)


def test_own_is_ready_is_chained(fallback_env: Path):
    from tests.helpers import wait_for

    @registry_admin
    @bentoml.service(name="chained")
    class Chained:
        host = ModelHost()
        open_for_business = False

        def __is_ready__(self) -> bool:
            return self.open_for_business

    instance = Chained.inner()  # what a worker builds (one ASGI app per process: BentoML's metrics are global)
    try:
        wait_for(lambda: _quiet(lambda: hosts_ready(instance)), 60, "the host to load the fallback")
        assert instance.__is_ready__() is False  # the host is ready, the class's own check says no
        instance.open_for_business = True
        assert instance.__is_ready__() is True
    finally:
        stop_hosts(instance)


def _quiet(check: Any) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a 503 while loading
        return False


@pytest.fixture(scope="module")
def main_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """service.py in this process (one ASGI app per process: BentoML's metrics are process-wide)."""
    import service

    with pytest.MonkeyPatch.context() as monkeypatch:
        set_fallback_env(tmp_path_factory.mktemp("main"), monkeypatch)
        with TestClient(service.SecurityClassifier.to_asgi()) as client:
            wait_ready(client)
            yield client


def test_every_error_is_json_and_both_routes_say_the_same(main_service: TestClient):
    client = main_service
    auth = {"Authorization": f"Bearer {TOKEN}"}
    got = client.get("/classify")
    assert (got.status_code, got.headers["content-type"], got.json()) == (
        405, "application/json", {"error": "method GET not allowed on /classify; use POST"})
    missing = client.get("/no/such/route")
    assert (missing.status_code, missing.json()) == (404, {"error": "no route /no/such/route on this service"})
    assert client.put("/models").json() == {"error": "method PUT not allowed on /models; use GET"}

    # One rule for unknown fields: 400 naming the field, on /classify as on /reload.
    extra_classify = client.post("/classify", json={"texts": ["hi"], "colour": "red"})
    extra_reload = client.post("/reload", json={"colour": "red"}, headers=auth)
    assert extra_classify.status_code == extra_reload.status_code == 400
    assert extra_classify.json()["error"] == extra_reload.json()["error"] == "invalid request body at colour: Extra inputs are not permitted"
    # One message for a body that is not JSON.
    bad = {"content": b'{"texts": [', "headers": {"content-type": "application/json", **auth}}
    assert client.post("/classify", **bad).json() == client.post("/reload", **bad).json()
    assert client.post("/classify", **bad).json()["error"] == "invalid request body: not valid JSON"
    # The error classes' statuses on the service's own route.
    assert client.post("/classify", json={"texts": ["hi"], "model": "zz"}).status_code == 404
    assert client.post("/classify", json={"texts": ["hi"]}).status_code == 200


def test_times_are_iso_8601_utc_in_every_answer(main_service: TestClient):
    from datetime import datetime

    auth = {"Authorization": f"Bearer {TOKEN}"}
    health = main_service.get("/registry/health", headers=auth).json()
    models = main_service.get("/models", headers=auth).json()
    reloaded = main_service.post("/reload", json={}, headers=auth).json()

    def times(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
        if isinstance(value, dict):
            for key, item in value.items():
                if key.endswith("_at") or key in ("at", "timestamp"):
                    yield f"{path}.{key}", item
                yield from times(item, f"{path}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from times(item, f"{path}[{i}]")

    found = list(times(health)) + list(times(models)) + list(times(reloaded))
    assert any(path.endswith("loaded_at") for path, _ in found), found
    for path, value in found:
        if value is None:
            continue
        assert isinstance(value, str) and datetime.fromisoformat(value).utcoffset().total_seconds() == 0, (path, value)


def test_a_log_record_says_its_logger_layer_and_tag():
    record = logging.LogRecord("registry.sources.file_backup", logging.WARNING, __file__, 1, "[FALLBACK] file unavailable: %s",
                               ("disk gone",), None)
    line = json.loads(JSONFormatter().format(record))
    assert (line["logger"], line["layer"], line["tag"], line["message"]) == (
        "registry.sources.file_backup", "file", "FALLBACK", "file unavailable: disk gone")
    assert (record.layer, record.tag) == ("file", "FALLBACK")  # on the record too, for any text format
    chain = logging.LogRecord("registry.resolver", logging.INFO, __file__, 1, "[HYBRID] m@latest -> version 2", (), None)
    chain.registry_fields = log_fields("m", "2", "mlflow")["registry_fields"]
    line = json.loads(JSONFormatter().format(chain))
    assert (line["layer"], line["tag"], line["model"], line["version"]) == ("mlflow", "HYBRID", "m", "2")
    cache = logging.LogRecord("runners.artifacts", logging.INFO, __file__, 1, "[CACHE] hit", (), None)
    assert json.loads(JSONFormatter().format(cache))["layer"] == "redis"


def test_every_package_of_the_service_logs_at_the_configured_level():
    """REGISTRY_LOG_LEVEL reaches every package the service runs (BentoML passes only WARNING and up from
    loggers nobody configured: a package missing here loses its INFO lines: swaps, rollouts, refusals)."""
    from registry.logs import LOGGERS

    repo = Path(__file__).resolve().parent.parent
    packages = {p.parent.name for p in repo.glob("*/__init__.py")} - {"tests", "bench", "examples", "docs"}
    assert packages | {"service"} <= set(LOGGERS), sorted(packages - set(LOGGERS))
