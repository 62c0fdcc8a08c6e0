"""The write side against the real MLflow server (+ S3) and Redis."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pytest
import redis

from registry.digest import tree_sha256
from registry.payload import RegistryPayload
from registry.sources.mlflow_registry import MLflowRegistrySource
from tests.helpers import publish_tiny, settings_for

pytestmark = pytest.mark.servers


def test_publish_moves_best_only_when_beaten_and_refreshes_cache_and_file(mlflow_srv, redis_srv, s3_srv, tmp_path, cache_key):
    name = "publisher_alias"
    settings = settings_for(tmp_path, redis_url=f"redis://127.0.0.1:{redis_srv.port}/0", cache_key=cache_key,
                            mlflow_uri=mlflow_srv.url)
    first = publish_tiny(settings, name, seed=1, f1=0.70)
    assert first.record.version == "1" and first.best_moved and first.previous_best is None

    worse = publish_tiny(settings, name, seed=2, f1=0.60)
    assert worse.record.version == "2" and not worse.best_moved and worse.previous_best == "1"

    better = publish_tiny(settings, name, seed=3, f1=0.90)
    assert better.record.version == "3" and better.best_moved and better.previous_best == "1"

    client = MLflowRegistrySource(mlflow_srv.url).client
    aliases = client.get_registered_model(f"security_{name}").aliases
    assert aliases == {"best": "3"}, "only `best` is set; `latest` is reserved by MLflow and means the highest version"

    # the digest recorded is the digest of what sits in S3
    record = better.record
    assert record.artifact_uri.startswith("s3://artifacts/")
    bucket, _, prefix = record.artifact_uri[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=s3_srv.url)
    dest = tmp_path / "s3copy"
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]:
        target = dest / obj["Key"][len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj["Key"], str(target))
    assert tree_sha256(dest) == record.sha256

    # cache (with TTL) and backup both carry the three versions and the moved alias
    r = redis.Redis(port=redis_srv.port)
    assert 0 < r.ttl(cache_key) <= 3600
    for raw in (r.get(cache_key), settings.backup_path.read_bytes()):
        section = RegistryPayload.parse(raw, "t").section(name, source="t")
        assert [v.version for v in section.versions] == ["1", "2", "3"]
        assert section.best.version == "3" and section.latest.version == "3"
        assert section.best.metrics["f1"] == pytest.approx(0.90)
        assert section.versions[0].sha256 == first.record.sha256


def test_publish_keeps_other_models_in_cache_and_file(mlflow_srv, redis_srv, tmp_path, cache_key):
    settings = settings_for(tmp_path, redis_url=f"redis://127.0.0.1:{redis_srv.port}/0", cache_key=cache_key,
                            mlflow_uri=mlflow_srv.url)
    publish_tiny(settings, "publisher_a", seed=1, f1=0.5)
    publish_tiny(settings, "publisher_b", seed=2, f1=0.5)
    for raw in (redis.Redis(port=redis_srv.port).get(cache_key), settings.backup_path.read_bytes()):
        payload = json.loads(raw)
        assert {"publisher_a", "publisher_b"} <= set(payload["latest_models"])


def test_publish_and_resolve_commands(mlflow_srv, tmp_path):
    import subprocess
    import sys

    from tests.servers import QUIET_ENV
    from tests.tiny_models import tiny_classifier

    model, tokenizer = tiny_classifier(seed=5)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": mlflow_srv.url, "REGISTRY_BACKUP_PATH": str(tmp_path / "backup.json")}
    repo = Path(__file__).resolve().parent.parent

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.cli", *args], env=env, cwd=repo, capture_output=True, text=True, timeout=180)

    published = run("publish", "--name", "cli_model", "--model-dir", str(tmp_path / "hf"), "--metric", "f1=0.8", "--flavor", "pytorch-pickle")
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["record"]["version"] == "1"
    resolved = run("resolve", "--name", "cli_model", "--selector", "best")
    assert resolved.returncode == 0, resolved.stderr
    body = json.loads(resolved.stdout)
    assert body["record"]["version"] == "1" and body["trail"][-1]["source"] == "mlflow"
    bad = run("publish", "--name", "cli_model", "--model-dir", str(tmp_path / "hf"), "--metric", "f1=high")
    assert bad.returncode == 2 and "not a number" in bad.stderr
    missing = run("resolve", "--name", "nothing_here")
    assert missing.returncode == 2 and "nothing_here" in missing.stderr
