"""Session-wide real servers: redis-server, moto's S3 server, `mlflow server`, the training API."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.servers import QUIET_ENV, S3_ENV, ManagedServer, mlflow_server, redis_server, s3_server, training_api

BUCKET = "artifacts"

# Telemetry off and nothing from the hub, for this process and every server it starts.
os.environ.update(QUIET_ENV)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def redis_srv(server_logs: Path) -> Iterator[ManagedServer]:
    server = redis_server(server_logs).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_srv(server_logs: Path) -> Iterator[ManagedServer]:
    import boto3

    server = s3_server(server_logs).start()
    os.environ.update(S3_ENV)
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = server.url
    boto3.client("s3", endpoint_url=server.url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_srv(server_logs: Path, s3_srv: ManagedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    db = tmp_path_factory.mktemp("mlflow-db") / "mlflow.db"
    server = mlflow_server(server_logs, db, f"s3://{BUCKET}/mlflow", s3_srv.url).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def training_api_srv(server_logs: Path, redis_srv: ManagedServer, mlflow_srv: ManagedServer,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    env = {
        "REGISTRY_REDIS_URL": f"redis://127.0.0.1:{redis_srv.port}/1",
        "MLFLOW_TRACKING_URI": mlflow_srv.url,
        "REGISTRY_BACKUP_PATH": str(tmp_path_factory.mktemp("training-api") / "model_registry.json"),
        "REGISTRY_CACHE_TTL": "2",  # short, so tests see MLflow changes through the API quickly
    }
    server = training_api(server_logs, env).start()
    yield server
    server.stop()


@pytest.fixture
def cache_key() -> str:
    """A Redis key of this test's own, so tests never see each other's cached payloads."""
    return f"model_registry:{uuid.uuid4().hex[:12]}"
