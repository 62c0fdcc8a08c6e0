"""Trust: signed payloads through every layer, and Redis with a password or TLS from the URL alone."""

from __future__ import annotations

import subprocess

import httpx
import pytest
import redis

from registry.errors import ModelNotResolvable
from registry.resolver import Resolver
from registry.signing import PayloadCodec
from tests.helpers import publish_tiny, settings_for
from tests.servers import ManagedServer, free_port, redis_server, training_api

pytestmark = pytest.mark.servers

MODEL = "trusted"
KEY = "trust-key"


@pytest.fixture(scope="module")
def signed_stack(tmp_path_factory, server_logs, redis_srv, mlflow_srv):
    root = tmp_path_factory.mktemp("trust")
    redis_url = f"redis://127.0.0.1:{redis_srv.port}/3"
    settings = settings_for(root, mlflow_uri=mlflow_srv.url, redis_url=redis_url, cache_key="signed_registry", signing_key=KEY)
    publish_tiny(settings, MODEL, seed=61, f1=0.7)
    publish_tiny(settings, MODEL, seed=62, f1=0.8)
    api = training_api(server_logs, {"REGISTRY_REDIS_URL": f"redis://127.0.0.1:{redis_srv.port}/4", "MLFLOW_TRACKING_URI": mlflow_srv.url,
                                     "REGISTRY_BACKUP_PATH": str(root / "api-backup.json"), "REGISTRY_SIGNING_KEY": KEY}).start()
    yield {"settings": settings, "api": api, "redis": redis.Redis(port=redis_srv.port, db=3)}
    api.stop()


def outcomes(resolution_or_error) -> list[tuple[str, str]]:
    return [(a.source, a.outcome.value) for a in resolution_or_error.trail]


def test_publisher_and_training_api_sign_and_the_resolver_verifies(signed_stack):
    settings, api = signed_stack["settings"], signed_stack["api"]
    assert '"signature":"hmac-sha256:' in signed_stack["redis"].get("signed_registry").decode()
    assert '"signature":"hmac-sha256:' in settings.backup_path.read_text()
    body = httpx.get(f"{api.url}/models/latest", timeout=10)
    assert PayloadCodec(KEY).decode(body.content, "api").section(MODEL, source="t").latest.version == "2"

    with_api = settings.model_copy(update={"training_api_url": api.url})
    assert Resolver.from_settings(with_api).resolve(MODEL, "latest").record.source == "redis"
    signed_stack["redis"].delete("signed_registry")
    assert outcomes(Resolver.from_settings(with_api).resolve(MODEL, "latest"))[:2] == [("redis", "miss"), ("training_api", "hit")]


def test_unsigned_or_wrongly_signed_layers_are_rejected(signed_stack, tmp_path):
    settings, api = signed_stack["settings"], signed_stack["api"]
    good = PayloadCodec(KEY).decode(signed_stack["redis"].get("signed_registry") or settings.backup_path.read_bytes(), "t")

    # an unsigned cache and a backup signed with another key are both refused; MLflow answers
    signed_stack["redis"].set("signed_registry", PayloadCodec().encode(good))
    other_backup = tmp_path / "backup.json"
    other_backup.write_text(PayloadCodec("other-key").encode(good))
    strict = settings.model_copy(update={"backup_path": other_backup})
    res = Resolver.from_settings(strict).resolve(MODEL, "latest")
    assert outcomes(res) == [("redis", "rejected"), ("mlflow", "hit")]
    assert "unsigned payload refused" in res.trail[0].detail

    # the training API signs with its key: a service with another key refuses it
    wrong_key = settings.model_copy(update={"training_api_url": api.url, "redis_url": None, "mlflow_tracking_uri": None,
                                            "signing_key": "not-the-key", "backup_path": other_backup})
    with pytest.raises(ModelNotResolvable) as err:
        Resolver.from_settings(wrong_key).resolve(MODEL, "latest")
    assert outcomes(err.value) == [("training_api", "rejected"), ("file", "rejected")]
    assert "signature does not match" in str(err.value)


def test_redis_with_password_from_the_url_alone(tmp_path, server_logs, mlflow_srv):
    server = redis_server(server_logs, password="s3cr3t!").start()
    try:
        settings = settings_for(tmp_path, mlflow_uri=mlflow_srv.url, redis_url=f"redis://:s3cr3t%21@127.0.0.1:{server.port}/0")
        publish_tiny(settings, "pw_model", seed=63, f1=0.5)
        assert Resolver.from_settings(settings).resolve("pw_model", "latest").record.source == "redis"
        wrong = settings.model_copy(update={"redis_url": f"redis://:nope@127.0.0.1:{server.port}/0"})
        res = Resolver.from_settings(wrong).resolve("pw_model", "latest")
        assert outcomes(res)[0] == ("redis", "unavailable") and "Authentication" in res.trail[0].detail
    finally:
        server.stop()


def test_redis_over_tls_from_the_url_alone(tmp_path, server_logs, mlflow_srv):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    server = ManagedServer("redis-tls", ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                                         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                                         "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"], port, server_logs).start()
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        settings = settings_for(tmp_path, mlflow_uri=mlflow_srv.url, redis_url=url)
        publish_tiny(settings, "tls_model", seed=64, f1=0.5)
        res = Resolver.from_settings(settings).resolve("tls_model", "latest")
        assert res.record.source == "redis" and outcomes(res) == [("redis", "hit")]
    finally:
        server.stop()
