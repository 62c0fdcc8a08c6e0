"""Start the BentoML service as a real `bentoml serve` subprocess for end-to-end tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import httpx

from tests.servers import QUIET_ENV, VENV_BIN, ManagedServer, free_port, http_ok

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token"


class ServiceProcess(ManagedServer):
    """`bentoml serve service:SecurityClassifier` on a free port; alive once /livez answers."""

    def __init__(self, log_dir: Path, env: dict[str, str], *, workers: int = 1, port: Optional[int] = None,
                 target: str = "service:SecurityClassifier", cwd: Path = REPO):
        port = port or free_port()
        argv = [str(VENV_BIN / "bentoml"), "serve", target, "--port", str(port), "--host", "127.0.0.1"]
        full_env = {**QUIET_ENV, "REGISTRY_WORKERS": str(workers), "BENTOML_HOME": str(log_dir / "bentoml-home"),
                    "REGISTRY_RETRY_INTERVAL": "2", **env}
        super().__init__("service", argv, port, log_dir, env=full_env, cwd=cwd,
                         ready=http_ok(f"http://127.0.0.1:{port}/livez"), start_timeout=120)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        # The operator's view: /models and /registry/health give their detail only with the admin token.
        token = full_env.get("REGISTRY_ADMIN_TOKEN") or ADMIN_TOKEN
        self.admin = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {token}"})

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds until /readyz answered 200; fails with the service log otherwise."""
        start = time.monotonic()
        last: Any = None
        while time.monotonic() - start < timeout:
            try:
                last = self.client.get("/readyz")
                if last.status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"service not ready after {timeout}s (last: {getattr(last, 'text', last)!r}):\n{self.log_tail()}")

    def classify(self, texts: list[str], model: Optional[str] = None) -> httpx.Response:
        body: dict[str, Any] = {"texts": texts}
        if model:
            body["model"] = model
        return self.client.post("/classify", json=body)

    def reload(self, token: Optional[str] = ADMIN_TOKEN, **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.post("/reload", json=body, headers=headers, timeout=180)

    def stop(self) -> None:
        self.client.close()
        self.admin.close()
        super().stop()
