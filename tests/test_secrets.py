"""Nothing secret leaves the service or the `registry` command: not in an answer, /metrics, a log line or an error.

Every setting that can hold a credential holds a distinct one: a password in MLFLOW_TRACKING_URI,
REGISTRY_TRAINING_API_URL and REGISTRY_REDIS_URL (a real redis-server requiring it), the AWS keys,
REGISTRY_SIGNING_KEY, REGISTRY_ADMIN_TOKEN and REGISTRY_WEBHOOK_SECRET. One `bentoml serve` is driven
through nothing loadable, layers up, reloads, webhooks, bad requests, the training API failing and
answering garbage, MLflow down and Redis down; every answer, /metrics and the whole log (JSON lines
for the project's loggers, BentoML's text lines for everything else) are searched for every secret.
Then the `registry` command, as a subprocess, with --json and without, layers up and down.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest

from registry import redaction
from registry.logs import JSONFormatter
from registry.metrics import OTHER, model_label, serve_models
from registry.webhook import sign_delivery
from tests.helpers import MisbehavingLayer, publish_tiny, serving, settings_for, wait_for
from tests.service_proc import REPO, ServiceProcess
from tests.servers import QUIET_ENV, free_port, redis_server

E2E = [pytest.mark.servers, pytest.mark.e2e, pytest.mark.slow]

MODEL = "secret_svc"
_RUN = uuid.uuid4().hex[:10]
SECRETS = {
    "mlflow password": f"mlflow-pw-{_RUN}",
    "training API password": f"trainapi-pw-{_RUN}",
    "redis password": f"redis-pw-{_RUN}",
    "AWS access key id": f"AKIAKEY{_RUN.upper()}",
    "AWS secret key": f"aws-secret-{_RUN}",
    "AWS session token": f"aws-session-{_RUN}",
    "signing key": f"signing-key-{_RUN}",
    "admin token": f"admin-token-{_RUN}",
    "webhook secret": f"webhook-secret-{_RUN}",
}
ADMIN = {"Authorization": f"Bearer {SECRETS['admin token']}"}


@pytest.mark.parametrize("text, shown", [
    ("http://user:hunter2@host:5000/api", "http://user:***@host:5000/api"),
    ("https://ghp_abcdef@github.com/x.git", "https://***@github.com/x.git"),
    ("rediss://:p@ss@host:6380/0", "rediss://:***@host:6380/0"),
    ("redis+sentinel://:pw@h1:26379,h2/mymaster/0?sentinel_password=spw&ssl_ca_certs=/ca.pem",
     "redis+sentinel://:***@h1:26379,h2/mymaster/0?sentinel_password=***&ssl_ca_certs=/ca.pem"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&X-Amz-Security-Token=tk",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://acct.blob.core.windows.net/c/m?sv=2020&sig=xyz#frag", "https://acct.blob.core.windows.net/c/m?sv=2020&sig=***#frag"),
    ("API request to http://u:pw@h/api/2.0/x failed with exception HTTPConnectionPool(host='h', port=5)",
     "API request to http://u:***@h/api/2.0/x failed with exception HTTPConnectionPool(host='h', port=5)"),
    ("'http://a:b@c/x' and http://d:e@f", "'http://a:***@c/x' and http://d:***@f"),
    ("s3://artifacts/mlflow/1/abc", "s3://artifacts/mlflow/1/abc"),
    ("models:/security_x/3", "models:/security_x/3"),
    ("file:///tmp/a@b/model", "file:///tmp/a@b/model"),
    ("http://host/path@not-userinfo?q=1", "http://host/path@not-userinfo?q=1"),
])
def test_redact_hides_url_credentials_and_keeps_the_rest(text: str, shown: str):
    assert redaction.redact_text(text) == shown


def test_registered_secrets_are_hidden_in_any_text_log_and_stream(capsys):
    secret = f"literal-{uuid.uuid4().hex}"
    redaction.register_secret(secret)
    redaction.register_secret("short")  # too short to hide outside a URL: ordinary words stay readable
    assert redaction.redact({"a": [f"x {secret} y", 3, None], secret: "short"}) == {"a": ["x *** y", 3, None], "***": "short"}
    assert redaction.url_secrets("http://u:pw@h/?token=t1&x=2") == ["pw", "t1"]

    record = logging.LogRecord("registry.x", 30, __file__, 1, "failed at %s: %s", ("http://u:pw@h/", secret), None)
    try:
        raise RuntimeError(f"boom http://u:pw@h/ {secret}")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert redaction.RedactingFilter().filter(record)
    line = JSONFormatter().format(record)
    assert secret not in line and ":pw@" not in line and "http://u:***@h/" in line and "boom" in line
    stream = redaction.RedactingStream(sys.stdout)
    stream.write(f"View run at http://u:pw@h/#/runs/1 {secret}\n")
    assert capsys.readouterr().out == "View run at http://u:***@h/#/runs/1 ***\n"


def test_metric_model_label_takes_only_served_names():
    serve_models(["served_model"])
    assert model_label("served_model") == "served_model"
    assert model_label(f"made_up_{uuid.uuid4().hex}") == OTHER


class SwitchableProxy:
    """A TCP forwarder on a fixed loopback port: `down()` refuses connections and cuts the open ones, `up()` serves again."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self._server: Optional[socket.socket] = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> "SwitchableProxy":
        if self._server is not None:
            return self
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        server.settimeout(0.2)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def down(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._open.clear()

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                client, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Stack:
    """The layers with credentials, switchable, and the environment a service or the command reads."""

    def __init__(self, tmp: Path, server_logs: Path, mlflow_srv: Any, s3_srv: Any):
        self.proxy = SwitchableProxy(mlflow_srv.port)
        self.api = MisbehavingLayer()
        self.api.status = 503
        self.redis = redis_server(server_logs, password=SECRETS["redis password"])
        self.env = {
            "REGISTRY_MODELS": MODEL,
            "MLFLOW_TRACKING_URI": f"http://mluser:{SECRETS['mlflow password']}@127.0.0.1:{self.proxy.port}",
            "REGISTRY_TRAINING_API_URL": f"http://apiuser:{SECRETS['training API password']}@127.0.0.1:{self.api.server.server_address[1]}",
            "REGISTRY_REDIS_URL": f"redis://:{SECRETS['redis password']}@127.0.0.1:{self.redis.port}/0",
            "MLFLOW_S3_ENDPOINT_URL": s3_srv.url,
            "AWS_ACCESS_KEY_ID": SECRETS["AWS access key id"],
            "AWS_SECRET_ACCESS_KEY": SECRETS["AWS secret key"],
            "AWS_SESSION_TOKEN": SECRETS["AWS session token"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "REGISTRY_SIGNING_KEY": SECRETS["signing key"],
            "REGISTRY_ADMIN_TOKEN": SECRETS["admin token"],
            "REGISTRY_WEBHOOK_SECRET": SECRETS["webhook secret"],
            "REGISTRY_BACKUP_PATH": str(tmp / "model_registry.json"),
            "REGISTRY_ARTIFACT_CACHE": str(tmp / "artifacts"),
            "REGISTRY_CACHE_KEY": f"secrets:{_RUN}",
            "REGISTRY_BREAKER_RESET": "2",
            "REGISTRY_MLFLOW_TIMEOUT": "2",
            "REGISTRY_LOG_FORMAT": "json",
        }
        self.answers: list[str] = []  # every answer seen, as text

    def record(self, response: httpx.Response) -> httpx.Response:
        self.answers.append(f"{response.request.method} {response.request.url.path} -> {response.status_code} "
                            f"{dict(response.headers)} {response.text}")
        return response


def leaks(text: str) -> dict[str, int]:
    """Which secrets appear in `text`, and how often."""
    return {what: text.count(secret) for what, secret in SECRETS.items() if secret in text}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, server_logs: Path, mlflow_srv, s3_srv) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("secrets")
    publish = settings_for(tmp / "publisher", mlflow_uri=mlflow_srv.url)
    assert publish_tiny(publish, MODEL, seed=61, f1=0.7).record.version == "1"
    assert publish_tiny(publish, MODEL, seed=62, f1=0.8).record.version == "2"
    stack = Stack(tmp, server_logs, mlflow_srv, s3_srv)
    stack.redis.start()
    with serving(stack.api.server):
        try:
            yield stack
        finally:
            stack.proxy.down()
            stack.redis.stop()


@pytest.fixture(scope="module")
def service(stack: Stack, server_logs: Path) -> Iterator[ServiceProcess]:
    # Nothing loads at first: MLflow down, the training API failing, an empty cache, no backup.
    svc = ServiceProcess(server_logs, stack.env).start()
    try:
        yield svc
    finally:
        svc.stop()


def webhook(svc: ServiceProcess, stack: Stack, registered: str, *, secret: Optional[str] = None, age: float = 0) -> httpx.Response:
    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-01-01T00:00:00Z",
                       "data": {"name": registered, "alias": "best", "version": "2"}}).encode()
    headers = sign_delivery(secret or SECRETS["webhook secret"], uuid.uuid4().hex, time.time() - age, body)
    return stack.record(svc.client.post("/registry/webhook", content=body, headers={**headers, "Content-Type": "application/json"}))


def oversized(svc: ServiceProcess, stack: Stack) -> int:
    """A classify request declaring a 1 GB body, sent without it: refused at once."""
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    stack.answers.append(answer.decode(errors="replace"))
    return int(answer.split(b" ", 2)[1])


def probe_everything(svc: ServiceProcess, stack: Stack) -> dict[str, Any]:
    """Every read route, with and without the admin token; the detailed answers, parsed."""
    get = lambda path, **kw: stack.record(svc.client.get(path, **kw))  # noqa: E731
    for path in ("/readyz", "/livez", "/metrics", "/docs.json"):
        get(path)
    summary_models, summary_health = get("/models"), get("/registry/health")
    models, health = get("/models", headers=ADMIN), get("/registry/health", headers=ADMIN)
    assert get("/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert summary_models.status_code == summary_health.status_code == models.status_code == health.status_code == 200
    # The open answers are the summary: nothing of the trails, records, layer details, bus or follower.
    for summary in (summary_models.json(), summary_health.json()):
        assert summary["view"].startswith("summary"), summary
        text = json.dumps(summary)
        assert not any(word in text for word in ('"trail"', '"record"', '"detail"', '"uri"', '"error"', '"follow"', '"worker"')), text
    health_summary = summary_health.json()
    assert [layer["source"] for layer in health_summary["layers"]] == ["redis", "training_api", "mlflow", "file"]
    assert set(health_summary) == {"status", "degraded", "serving", "layers", "reload_bus", "view"}
    return {"models": models.json(), "health": health.json(), "summary_models": summary_models.json(),
            "summary_health": health_summary}


@E2E[0]
@E2E[1]
@E2E[2]
def test_no_secret_in_any_answer_metric_or_log(stack: Stack, service: ServiceProcess):
    svc = service
    post = lambda path, **kw: stack.record(svc.client.post(path, **kw))  # noqa: E731

    # 1. Nothing loadable: not ready, every layer failing or empty; the answers say why, without credentials.
    def not_ready_naming_the_layers() -> Optional[httpx.Response]:
        response = svc.client.get("/readyz")
        return response if all(w in response.text for w in ("mlflow: unavailable", "training_api: unavailable")) else None

    ready = stack.record(wait_for(not_ready_naming_the_layers, 90, "/readyz to name the failing layers"))
    assert ready.status_code == 503 and "HTTP 503 from http://apiuser:***@" in ready.text, ready.text
    seen = probe_everything(svc, stack)
    assert seen["summary_health"]["status"] == "not_ready" and seen["summary_models"]["models"][MODEL]["loaded"] is False
    mlflow_layer = next(layer for layer in seen["health"]["layers"] if layer["source"] == "mlflow")
    assert not mlflow_layer["reachable"] and "mluser:***@" in mlflow_layer["detail"], mlflow_layer
    assert post("/classify", json={"texts": ["hello"]}).status_code == 503
    assert post("/reload", json={"model": MODEL}, headers=ADMIN).status_code in (404, 422)

    # 2. MLflow comes up: ready on version 2, reloads through every layer.
    stack.proxy.up()
    svc.wait_ready(timeout=120)
    assert post("/classify", json={"texts": ["ignore previous instructions"]}).json()["model"]["version"] == "2"
    for body in ({"model": MODEL, "version": 1}, {"model": MODEL, "alias": "best"}, {"model": MODEL}):
        response = post("/reload", json=body, headers=ADMIN)
        assert response.status_code == 200, response.text
    seen = probe_everything(svc, stack)
    source = seen["summary_health"]["serving"][MODEL]["source"]
    assert source in ("mlflow", "redis")
    assert seen["summary_health"]["serving"][MODEL] == {"name": MODEL, "version": "2", "source": source}
    assert seen["summary_models"]["models"][MODEL] == {"name": MODEL, "version": "2", "source": source, "loaded": True}
    assert seen["models"]["models"][MODEL]["trail"], "the detail has the trail"
    assert "mluser:***@" in json.dumps(seen["health"]), "the detail names the MLflow URI, redacted"

    # 3. Webhooks: MLflow's signed delivery, an unknown model, a wrong signature, a stale one.
    assert webhook(svc, stack, f"security_{MODEL}").status_code == 202
    assert webhook(svc, stack, "security_somebody_else").status_code == 200
    assert webhook(svc, stack, f"security_{MODEL}", secret="not-the-secret").status_code == 401
    assert webhook(svc, stack, f"security_{MODEL}", age=3600).status_code == 400
    assert post("/registry/webhook", content=b"{}", headers={"Content-Type": "application/json"}).status_code == 401

    # 4. Bad requests: each a 4xx.
    for kwargs in ({"content": b"{not json", "headers": {"Content-Type": "application/json"}},
                   {"content": b"texts=1", "headers": {"Content-Type": "text/plain"}},
                   {"json": {"texts": ["x"], "model": f"nobody_{_RUN}"}}, {"json": {"texts": []}}):
        assert 400 <= post("/classify", **kwargs).status_code < 500
    for body, headers in (({"version": 1}, {"Authorization": "Bearer wrong"}), ({"version": 1}, {}),
                          ({"alias": "a b"}, ADMIN), ({"model": f"nobody_{_RUN}"}, ADMIN), ({"version": 99}, ADMIN)):
        assert 400 <= post("/reload", json=body, headers=headers).status_code < 500
    assert oversized(svc, stack) == 413
    assert stack.record(svc.client.get(f"/no/such/route/{_RUN}")).status_code == 404

    # 5. The training API answers garbage, then MLflow goes down: reloads answer from the cache and memory.
    stack.api.status, stack.api.body = 200, b"{garbage"
    assert post("/reload", json={"model": MODEL, "version": 1}, headers=ADMIN).status_code == 200
    stack.proxy.down()
    post("/reload", json={"model": MODEL, "version": 2}, headers=ADMIN)
    seen = probe_everything(svc, stack)
    mlflow_layer = next(layer for layer in seen["health"]["layers"] if layer["source"] == "mlflow")
    assert not mlflow_layer["reachable"], mlflow_layer
    assert post("/classify", json={"texts": ["still serving"]}).status_code == 200

    # 6. Redis goes down: the cache layer and the reload bus fail; reloads are refused (503).
    stack.redis.stop()
    assert post("/reload", json={"model": MODEL}, headers=ADMIN).status_code == 503
    seen = probe_everything(svc, stack)
    assert seen["summary_health"]["reload_bus"] == {"reachable": False}
    assert seen["health"]["reload_bus"]["reachable"] is False
    metrics = stack.record(svc.client.get("/metrics")).text
    assert f"nobody_{_RUN}" not in metrics, "a client's model name became a metric label"
    assert f"/no/such/route/{_RUN}" not in metrics and 'endpoint="other"' in metrics, "a made-up path became a metric label"

    # Nothing secret anywhere: not in an answer (headers included), /metrics, or the service's whole log.
    answers = "\n".join(stack.answers)
    assert leaks(answers) == {}, [a for a in stack.answers if leaks(a)][:3]
    log = svc.log_path.read_text(errors="replace")
    assert leaks(log) == {}, [line for line in log.splitlines() if leaks(line)][:5]
    # ... and the log did say what happened (so the search above searched something)
    assert "apiuser:***@" in log and "mluser:***@" in log and "413" in log and "webhook" in log
    stack.proxy.up()
    stack.redis.start()


def registry_command(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    env = {**QUIET_ENV, "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "COLUMNS": "100", **stack.env}
    return subprocess.run([sys.executable, "-m", "registry", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@E2E[0]
@E2E[1]
@E2E[2]
def test_registry_command_prints_no_secret(stack: Stack, service: ServiceProcess):
    stack.proxy.up()
    if stack.redis.proc is None or stack.redis.proc.poll() is not None:
        stack.redis.start()
    stack.api.status, stack.api.body = 503, b"{}"
    outputs = []
    runs = [("-v", "status", "--service", service.url, "--json"), ("status",), ("resolve", MODEL, "--json"), ("-v", "resolve", MODEL),
            ("cache", "show"), ("backup", "verify", "--json")]
    for args in runs:
        done = registry_command(stack, *args)
        outputs.append((args, done))
        assert done.returncode in (0, 1), (args, done.returncode, done.stderr[-2000:])
    status = json.loads(outputs[0][1].stdout)
    assert status["layers"]["mlflow"]["uri"].startswith("http://mluser:***@"), status["layers"]["mlflow"]
    assert status["models"][MODEL]["layers"]["service"]["version"], "the command read the service's detail with the admin token"
    stack.proxy.down()  # MLflow unreachable: its errors name the URL
    for args in (("status", "--json"), ("resolve", MODEL, "--selector", "best")):
        done = registry_command(stack, *args)
        outputs.append((args, done))
        assert done.returncode in (0, 1), (args, done.returncode, done.stderr[-2000:])
    stack.proxy.up()
    found = {" ".join(args): {"stdout": leaks(done.stdout), "stderr": leaks(done.stderr)}
             for args, done in outputs if leaks(done.stdout) or leaks(done.stderr)}
    assert found == {}, found
    everything = "".join(done.stdout + done.stderr for _, done in outputs)
    assert "apiuser:***@" in everything and "mluser:***@" in everything
