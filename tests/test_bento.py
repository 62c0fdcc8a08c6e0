"""`bentoml build` works offline and the bento holds what the service needs (containerizing needs Docker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.servers import QUIET_ENV, VENV_BIN

REPO = Path(__file__).resolve().parent.parent


def test_bento_builds_with_service_code_pins_and_envs(tmp_path):
    home = tmp_path / "bentoml"
    env = {**os.environ, **QUIET_ENV, "BENTOML_HOME": str(home), "UV_CACHE_DIR": str(REPO / ".cache" / "uv")}
    result = subprocess.run([str(VENV_BIN / "bentoml"), "build", "--output", "tag"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    bento_dirs = [p for p in (home / "bentos" / "security_classifier").iterdir() if p.is_dir() and p.name != "latest"]
    assert len(bento_dirs) == 1
    bento = bento_dirs[0]

    src = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*.py")}
    assert "service.py" in src
    for module in ("registry/resolver.py", "registry/coordination.py", "registry/sources/redis_cache.py",
                   "registry/sources/mlflow_registry.py", "registry/sources/file_backup.py", "runners/runner.py",
                   "runners/manager.py", "runners/batching.py", "runners/artifacts.py"):
        assert module in src, module
    assert not any(p.startswith("tests/") for p in src), "tests are not shipped"

    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    for pin in ("torch==2.13.0", "transformers==5.24.0", "mlflow==3.17.2", "redis==8.1.0", "bentoml==1.4.40"):
        assert pin in requirements, pin

    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "service:SecurityClassifier"
    declared = {e["name"] for e in manifest["envs"]}
    assert {"REGISTRY_MODELS", "REGISTRY_ALIAS", "REGISTRY_REDIS_URL", "REGISTRY_TRAINING_API_URL", "MLFLOW_TRACKING_URI",
            "REGISTRY_BACKUP_PATH", "REGISTRY_FALLBACK_MODELS", "REGISTRY_ARTIFACT_CACHE", "REGISTRY_ADMIN_TOKEN",
            "REGISTRY_WORKERS", "REGISTRY_SIGNING_KEY", "REGISTRY_ALLOWED_URIS", "REGISTRY_ALLOW_PICKLE"} <= declared
    assert (bento / "apis" / "openapi.yaml").exists()
    openapi = yaml.safe_load((bento / "apis" / "openapi.yaml").read_text())
    assert "/classify" in openapi["paths"]

    # the packaged service imports from the bento alone (no repo on the path)
    probe = subprocess.run([sys.executable, "-c", "import service; print(service.SecurityClassifier.name)"],
                           cwd=bento / "src", env={**env, "PYTHONPATH": str(bento / "src")}, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and "security_classifier" in probe.stdout, probe.stderr
