"""The plugin outside `service.py`: the sklearn spam filter of examples/spam, and the main service serving it too."""

from __future__ import annotations

import importlib.util
import sys
import uuid

import pytest

from tests.helpers import service_env, settings_for, wait_for
from tests.service_proc import REPO, ServiceProcess

pytestmark = [pytest.mark.servers, pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = REPO / "examples" / "spam"
SPAM = ["WIN a free cruise now, click bit.ly/x1", "URGENT: your account is locked, verify at win-now.example"]
HAM = ["Are we still meeting for lunch on Friday?", "Can you review my pull request about caching before Monday?"]


def example_trainer():
    spec = importlib.util.spec_from_file_location("spam_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["spam_train"] = module
    spec.loader.exec_module(module)
    return module


def stack(tmp_path, redis_srv, mlflow_srv, s3_srv, model: str) -> dict[str, str]:
    return service_env(tmp_path, mlflow_srv, s3_srv, REGISTRY_REDIS_URL=f"redis://127.0.0.1:{redis_srv.port}/4",
                       REGISTRY_CACHE_KEY=f"spam:{model}", REGISTRY_ALLOWED_URIS="models:/,s3://artifacts/")


def test_the_sklearn_example_serves_reloads_and_follows(tmp_path, server_logs, redis_srv, mlflow_srv, s3_srv):
    trainer = example_trainer()
    model = "spam"  # what the example declares; a registry prefix of this test's own keeps it apart
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    env = {**stack(tmp_path, redis_srv, mlflow_srv, s3_srv, prefix), "REGISTRY_MLFLOW_PREFIX": prefix}
    publisher_settings = settings_for(tmp_path, mlflow_uri=mlflow_srv.url, redis_url=env["REGISTRY_REDIS_URL"],
                                      cache_key=env["REGISTRY_CACHE_KEY"], mlflow_prefix=prefix)
    assert trainer.publish(publisher_settings, model, seed=1).record.version == "1"
    example = ServiceProcess(server_logs, env, target="service:SpamFilter", cwd=EXAMPLE)
    main = ServiceProcess(server_logs, {**env, "REGISTRY_MODELS": model, "REGISTRY_ARTIFACT_CACHE": str(tmp_path / "main-artifacts")})
    try:
        example.start()
        main.start()
        example.wait_ready()
        main.wait_ready()
        scored = example.client.post("/score", json={"texts": SPAM + HAM})
        assert scored.status_code == 200, scored.text
        body = scored.json()
        assert body["model"]["version"] == "1" and body["model"]["source"] in ("redis", "mlflow")
        assert [p["label"] for p in body["predictions"]] == ["spam", "spam", "ham", "ham"]
        assert all(0.5 < p["score"] <= 1.0 for p in body["predictions"])
        described = example.admin.get("/models").json()["models"]["spam"]
        assert described["runner"]["form"] == "mlflow-pyfunc" and "sklearn" in described["runner"]["flavors"]

        classified = main.classify(SPAM + HAM, model=model)  # the main service serves any model a runner accepts
        assert classified.status_code == 200, classified.text
        assert [p["label"] for p in classified.json()["predictions"]] == ["spam", "spam", "ham", "ham"]
        assert main.admin.get("/models").json()["models"][model]["runner"]["form"] == "mlflow-pyfunc"

        assert trainer.publish(publisher_settings, model, seed=2).record.version == "2"  # announced on the bus
        for service, score in ((example, lambda: example.client.post("/score", json={"texts": HAM})),
                               (main, lambda: main.classify(HAM, model=model))):
            wait_for(lambda s=score: s().json()["model"]["version"] == "2", 60, f"{service.url} to follow to version 2")

        reloaded = example.reload(model="spam", version=1)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["current"]["version"] == "1"
        assert example.client.post("/score", json={"texts": HAM}).json()["model"]["version"] == "1"
        assert example.client.post("/score", content=b"texts=1", headers={"Content-Type": "text/plain"}).status_code == 415
    finally:
        example.stop()
        main.stop()
