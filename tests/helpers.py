"""Test helpers: settings builders, a tiny misbehaving HTTP layer, publishing tiny models."""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx

from registry.settings import RegistrySettings
from tests.servers import free_port


def wait_for(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy, or fail naming what was awaited.

    Returns the truthy value. An `httpx.HTTPError` raised by `check` counts as "not yet".
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.HTTPError as exc:
            last = exc
        if last:
            return last
        threading.Event().wait(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Tally:
    """A thread-safe Counter that client threads add to and a test waits on, instead of sleeping."""

    def __init__(self) -> None:
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self._counts)

    def wait_more(self, key: str, more: int, timeout: float, what: str = "") -> None:
        """Block until `key` was counted `more` further times from now; fail after `timeout` seconds."""
        target = self[key] + more
        try:
            wait_for(lambda: self[key] >= target, timeout, what or f"{more} more counts of {key!r}", poll=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; counts: {dict(self.snapshot())}") from None


def dead_url() -> str:
    """A loopback URL where nothing listens (a stopped layer)."""
    return f"http://127.0.0.1:{free_port()}"


def service_env(tmp_path: Path, mlflow_srv: Any, s3_srv: Any, **variables: str) -> dict[str, str]:
    """Environment of a `bentoml serve` on the test stack: MLflow with S3 artifacts, backup file and
    artifact cache under `tmp_path`, the tests' admin token; `variables` add to it or override it."""
    from tests.service_proc import ADMIN_TOKEN

    return {
        "MLFLOW_TRACKING_URI": mlflow_srv.url,
        "MLFLOW_S3_ENDPOINT_URL": s3_srv.url,
        "REGISTRY_BACKUP_PATH": str(tmp_path / "model_registry.json"),
        "REGISTRY_ARTIFACT_CACHE": str(tmp_path / "artifacts"),
        "REGISTRY_ADMIN_TOKEN": ADMIN_TOKEN,
        **variables,
    }


def settings_for(tmp_path: Path, *, redis_url: Optional[str] = None, cache_key: str = "model_registry",
                 training_api_url: Optional[str] = None, mlflow_uri: Optional[str] = None,
                 fallback: Optional[dict[str, str]] = None, **extra: Any) -> RegistrySettings:
    values: dict[str, Any] = dict(
        redis_url=redis_url,
        cache_key=cache_key,
        redis_timeout=0.3,
        training_api_url=training_api_url,
        training_api_timeout=3.0,
        mlflow_tracking_uri=mlflow_uri,
        mlflow_timeout=2,
        backup_path=tmp_path / "model_registry.json",
        artifact_cache=tmp_path / "artifacts",
        fallback_models=fallback or {},
    )
    values.update(extra)
    return RegistrySettings.from_env(**values)


class MisbehavingLayer:
    """A real HTTP server on loopback that answers `/models/latest` however a test says."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b"{}"
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if outer.delay:
                    time.sleep(outer.delay)
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator["MisbehavingLayer"]:
        with serving(self.server):
            yield self


@contextmanager
def serving(server: Any) -> Iterator[Any]:
    """Run a `socketserver` server (http.server's) in a thread for the block, then shut it down."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def publish_tiny(settings: RegistrySettings, name: str, seed: int, f1: float, flavor: str = "transformers"):
    """Publish a tiny random BERT classifier as a new version of `name`."""
    from tests.tiny_models import tiny_classifier
    from training.publisher import Publisher

    model, tokenizer = tiny_classifier(seed)
    publisher = Publisher(settings)
    try:
        return publisher.publish(name, model, tokenizer, {"f1": f1, "accuracy": f1}, flavor=flavor)
    finally:
        publisher.close()


def save_hf_dir(path: Path, seed: int) -> Path:
    """A Hugging Face directory (config with id2label, weights, tokenizer) of a tiny classifier."""
    from tests.tiny_models import tiny_classifier

    model, tokenizer = tiny_classifier(seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reference_predictions(model, tokenizer, texts: list[str], **tokenizer_args: Any) -> list[tuple[str, float]]:
    """(label, score) per text, computed with plain transformers in this process: what a server must answer."""
    import torch

    encoded = tokenizer(texts, return_tensors="pt", **{"padding": True, "truncation": True, **tokenizer_args})
    with torch.inference_mode():
        scores, indices = torch.softmax(model(**encoded).logits, dim=-1).max(dim=-1)
    return [(model.config.id2label[i], s) for i, s in zip(indices.tolist(), scores.tolist())]


def tiny_predictions(seed: int, texts: list[str]) -> list[tuple[str, float]]:
    """What the tiny model published with `seed` answers."""
    from tests.tiny_models import tiny_classifier

    return reference_predictions(*tiny_classifier(seed), texts)


class ClassifyLoad:
    """Client threads classifying without pause against one or more services; every failure is recorded.

    `answers`: version -> (label, score) the first text must get (checked with a tolerance). Counts
    of answers by version are in `versions` (a Tally; key "ok" counts every 200).
    """

    def __init__(self, urls: str | list[str], texts: list[str], answers: Optional[dict[str, tuple[str, float]]] = None,
                 threads: int = 4):
        urls = [urls] if isinstance(urls, str) else urls
        self.texts = texts
        self.answers = answers
        self.failures: list[str] = []
        self.versions = Tally()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(urls[i % len(urls)],), daemon=True) for i in range(threads)]

    def _run(self, url: str) -> None:
        import httpx
        import pytest

        with httpx.Client(base_url=url, timeout=60) as http:
            while not self._stop.is_set():
                try:
                    response = http.post("/classify", json={"texts": self.texts})
                    if response.status_code != 200:
                        self.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                        continue
                    body = response.json()
                    version = body["model"]["version"]
                    if self.answers is not None:
                        label, score = self.answers[version]
                        got = body["predictions"][0]
                        if got["label"] != label or got["score"] != pytest.approx(score, abs=1e-4):
                            self.failures.append(f"version {version} answered {got}, expected {label} {score}")
                    self.versions.add("ok")
                    self.versions.add(version)
                except Exception as exc:  # a malformed answer is a failure too, not a dead client thread
                    self.failures.append(repr(exc))

    def wait_answers(self, version: str, more: int = 10, timeout: float = 30) -> None:
        """Block until the clients got `more` further answers from `version` ("ok": any), or fail."""
        try:
            self.versions.wait_more(version, more, timeout, f"{more} more answers from version {version}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; failures: {self.failures[:5]}") from None

    def __enter__(self) -> "ClassifyLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
