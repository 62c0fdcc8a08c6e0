"""The servers a run shares across areas, started on first use on loopback and stopped at the end.

Everything is started with the test helpers (`tests.servers`, `tests.service_proc`): redis-server,
`mlflow server` (sqlite, one worker, artifacts on local disk: resolution never touches them), the
reference training API, and `bentoml serve` of the service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from bench.demo_model import DemoModel, ensure_demo_model
from tests.servers import (
    QUIET_ENV,
    VENV_BIN,
    ManagedServer,
    free_port,
    http_ok,
    mlflow_server,
    redis_server,
    training_api,
)
from tests.service_proc import ADMIN_TOKEN, ServiceProcess

REPO = Path(__file__).resolve().parent.parent
#: Git-ignored (`/data/`): the demo model and its artifact cache persist here between runs.
DATA = REPO / "data" / "bench"

TINY_MODEL = "bench"
CACHE_KEY = "bench:model_registry"


@dataclass(frozen=True)
class TinyRegistry:
    """Two versions of a tiny classifier published through the MLflow server, the Redis cache and a backup file."""

    name: str
    redis_url: str
    cache_key: str
    mlflow_url: str
    backup_path: Path
    records: dict[str, Any]


class Lab:
    """Lazily started shared servers; `close()` stops every process this run started."""

    def __init__(self, run_dir: Path, say: Callable[[str], None] = print):
        self.run_dir = run_dir
        self.log_dir = run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.say = say
        self._stack = contextlib.ExitStack()
        self._redis: Optional[ManagedServer] = None
        self._mlflow: Optional[ManagedServer] = None
        self._training: Optional[ManagedServer] = None
        self._tiny: Optional[TinyRegistry] = None
        self._demo: Optional[DemoModel] = None
        self._services = 0

    # -- lifetime ---------------------------------------------------------------------------------
    def own(self, server: ManagedServer) -> ManagedServer:
        self._stack.callback(server.stop)
        return server

    def close(self) -> None:
        self._stack.close()

    # -- shared servers ---------------------------------------------------------------------------
    def redis(self) -> ManagedServer:
        if self._redis is None:
            self._redis = self.own(redis_server(self.log_dir)).start()
        return self._redis

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis().port}/0"

    def mlflow(self) -> ManagedServer:
        if self._mlflow is None:
            started = time.perf_counter()
            artifacts = (self.run_dir / "mlflow-artifacts").as_uri()
            # The S3 endpoint is never used: artifacts go to local disk, written by the client directly.
            server = mlflow_server(self.log_dir, self.run_dir / "mlflow.db", artifacts, "http://127.0.0.1:9")
            self._mlflow = self.own(server).start()
            self.say(f"[bench] mlflow server up on {self._mlflow.url} in {time.perf_counter() - started:.1f} s")
        return self._mlflow

    def tiny_registry(self) -> TinyRegistry:
        """Publish two versions of a tiny model through the MLflow server (refreshing cache and backup)."""
        if self._tiny is None:
            from tests.helpers import publish_tiny, settings_for

            mlflow = self.mlflow()
            settings = settings_for(self.run_dir, redis_url=self.redis_url, cache_key=CACHE_KEY, mlflow_uri=mlflow.url,
                                    backup_path=self.run_dir / "tiny-registry.json")
            records = {}
            for seed, f1 in ((1, 0.7), (2, 0.8)):
                result = publish_tiny(settings, TINY_MODEL, seed, f1)
                records[result.record.version] = result.record
            self._tiny = TinyRegistry(TINY_MODEL, self.redis_url, CACHE_KEY, mlflow.url, settings.backup_path, records)
        return self._tiny

    def training_api(self) -> ManagedServer:
        """The reference training API over the same Redis key and MLflow server (answers from its cache)."""
        if self._training is None:
            tiny = self.tiny_registry()
            env = {
                "REGISTRY_REDIS_URL": tiny.redis_url,
                "REGISTRY_CACHE_KEY": tiny.cache_key,
                "MLFLOW_TRACKING_URI": tiny.mlflow_url,
                "REGISTRY_BACKUP_PATH": str(self.run_dir / "training-api-registry.json"),
            }
            self._training = self.own(training_api(self.log_dir, env)).start()
        return self._training

    def demo(self) -> DemoModel:
        if self._demo is None:
            self._demo = ensure_demo_model(DATA / "demo", say=self.say)
        return self._demo

    # -- the service under test -------------------------------------------------------------------
    def service_env(self, **extra: str) -> dict[str, str]:
        """`make serve`'s configuration for the demo model: sqlite MLflow + file backup, pinned to version 1."""
        demo = self.demo()
        self._services += 1
        return {
            "REGISTRY_MODELS": demo.name,
            "MLFLOW_TRACKING_URI": demo.tracking_uri,
            "REGISTRY_ALIAS": "1",
            "REGISTRY_BACKUP_PATH": str(self.run_dir / f"service-{self._services}-registry.json"),
            "REGISTRY_ARTIFACT_CACHE": str(demo.artifact_cache),
            "REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
            # The areas read the operator's detail of /models and /registry/health (load times, batch
            # counters, the follower) on the same open client as their load.
            "REGISTRY_HEALTH_DETAIL": "open",
            **extra,
        }

    def service(self, *, workers: int = 1, ready_timeout: float = 240, **extra: str) -> tuple[ServiceProcess, float]:
        """A started and ready `bentoml serve`; returns it and the seconds from spawn to /readyz 200."""
        env = self.service_env(**extra)
        started = time.perf_counter()
        svc = ServiceProcess(self.log_dir, env, workers=workers)
        svc.start_timeout = ready_timeout
        self.own(svc).start()
        svc.wait_ready(timeout=ready_timeout)
        return svc, time.perf_counter() - started

    def mlflow_models_serve(self) -> ManagedServer:
        """`mlflow models serve` of the same registered demo model: what a user would otherwise run."""
        demo = self.demo()
        port = free_port()
        argv = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{demo.registered_name}/1",
                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
        # It execs `uvicorn` by name: the venv's bin must be on PATH even when the venv is not activated.
        env = {**QUIET_ENV, "MLFLOW_TRACKING_URI": demo.tracking_uri, "MLFLOW_REGISTRY_URI": demo.tracking_uri,
               "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        server = ManagedServer("mlflow-models-serve", argv, port, self.log_dir, env=env, cwd=self.run_dir,
                               ready=http_ok(f"http://127.0.0.1:{port}/ping"), start_timeout=240)
        return self.own(server).start()


def rss_mib(pid: int) -> Optional[float]:
    """Resident memory of a process and all its descendants, in MiB."""
    try:
        import psutil

        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total / 1024 / 1024
    except Exception:  # psutil missing or the process gone: memory is reported as unknown
        return None


def fresh_python(code: str, env: Optional[dict[str, str]] = None, timeout: float = 300) -> tuple[float, str]:
    """Wall seconds of `python -c code` in a new interpreter (imports included), and its stdout."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **QUIET_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"fresh python failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def reset_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_json(client: httpx.Client, path: str) -> Any:
    response = client.get(path)
    response.raise_for_status()
    return response.json()
