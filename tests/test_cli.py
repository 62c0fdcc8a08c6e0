"""The `registry` operator command against the real Redis, MLflow server and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

import pytest
import redis
from click.testing import CliRunner, Result

from registry.cli import cli
from registry.payload import RegistryPayload
from registry.sources.mlflow_registry import MLflowRegistrySource
from tests.helpers import MisbehavingLayer, publish_tiny, save_hf_dir, settings_for
from tests.servers import QUIET_ENV, free_port

pytestmark = pytest.mark.servers

REPO = Path(__file__).resolve().parent.parent


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class Registry:
    """One test's registry: its own model name, cache key, backup and artifact cache; runs the command."""

    def __init__(self, tmp_path: Path, redis_port: int, mlflow_url: str, cache_key: str, name: str, **settings: Any):
        self.name = name
        self.redis = redis.Redis(port=redis_port)
        self.cache_key = cache_key
        self.settings = settings_for(tmp_path, redis_url=f"redis://127.0.0.1:{redis_port}/0", cache_key=cache_key,
                                     mlflow_uri=mlflow_url, **settings)
        self.env: dict[str, Optional[str]] = {k: None for k in os.environ if k.startswith("REGISTRY_")}
        self.env.update({
            "MLFLOW_TRACKING_URI": mlflow_url,
            "REGISTRY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "REGISTRY_CACHE_KEY": cache_key,
            "REGISTRY_BACKUP_PATH": str(self.settings.backup_path),
            "REGISTRY_ARTIFACT_CACHE": str(self.settings.artifact_cache),
            "REGISTRY_RELOAD_DIR": None,
        })
        if self.settings.signing_key is not None:
            self.env["REGISTRY_SIGNING_KEY"] = self.settings.signing_key.get_secret_value()

    def publish(self, seed: int, f1: float) -> Any:
        return publish_tiny(self.settings, self.name, seed=seed, f1=f1).record

    def run(self, *args: str, env: Optional[dict[str, Optional[str]]] = None) -> Result:
        return CliRunner().invoke(cli, list(args), env={**self.env, **(env or {})}, catch_exceptions=False)

    def json(self, *args: str, code: int = 0, env: Optional[dict[str, Optional[str]]] = None) -> dict[str, Any]:
        result = self.run(*args, "--json", env=env)
        assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        return json.loads(result.stdout)

    def table(self, *args: str, code: int = 0, env: Optional[dict[str, Optional[str]]] = None) -> str:
        result = self.run(*args, env=env)
        assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        return result.stdout

    def cached(self) -> RegistryPayload:
        raw = self.redis.get(self.cache_key)
        assert raw is not None, f"nothing cached under {self.cache_key}"
        return RegistryPayload.parse(raw, "redis")

    def backup(self) -> RegistryPayload:
        return RegistryPayload.parse(self.settings.backup_path.read_bytes(), "backup")


@pytest.fixture
def reg(tmp_path: Path, redis_srv, mlflow_srv, s3_srv, cache_key: str, request: pytest.FixtureRequest) -> Registry:
    return Registry(tmp_path, redis_srv.port, mlflow_srv.url, cache_key, unique("cli_" + request.node.name[5:16]))


@pytest.mark.slow
def test_status_agrees_then_marks_an_older_cached_payload_and_a_stale_service(reg: Registry, training_api_srv, redis_srv):
    reg.publish(seed=1, f1=0.70)
    older = reg.redis.get(reg.cache_key)
    reg.publish(seed=2, f1=0.90)
    # The training API keeps its own short-lived cache (db 1): empty it so it reads MLflow now.
    redis.Redis(port=redis_srv.port, db=1).delete("model_registry")
    api = {"REGISTRY_TRAINING_API_URL": training_api_srv.url}

    agree = reg.json("status", "--model", reg.name, env=api)
    assert agree["ok"] and agree["disagreements"] == [] and agree["problems"] == []
    layers = agree["models"][reg.name]["layers"]
    assert list(layers) == ["redis", "training_api", "mlflow", "file"]
    for layer in ("redis", "training_api", "mlflow", "file"):
        assert (layers[layer]["latest"], layers[layer]["best"], layers[layer]["versions"]) == ("2", "2", ["1", "2"]), layer
    assert 0 < agree["layers"]["redis"]["ttl_s"] <= 3600
    assert agree["layers"]["file"]["age_s"] is not None and agree["layers"]["file"]["age_s"] < 600
    assert "every layer agrees with MLflow" in reg.table("status", "--model", reg.name, env=api)

    reg.redis.set(reg.cache_key, older, ex=3600)  # the cache now says what it said before version 2
    poisoned = reg.json("status", "--model", reg.name, code=1)
    marked = {(d["layer"], d["selector"], d["holds"], d["mlflow"]) for d in poisoned["disagreements"]}
    assert marked == {("redis", "latest", "1", "2"), ("redis", "best", "1", "2")}
    assert not poisoned["ok"] and poisoned["models"][reg.name]["layers"]["file"].get("disagreements") == []
    table = reg.table("status", "--model", reg.name, code=1)
    assert "1 ≠ 2" in table and "latest is 1, MLflow says 2" in table
    print(table)

    refreshed = reg.json("cache", "refresh", "--model", reg.name)
    assert refreshed["models"][reg.name]["latest"] == "2" and refreshed["models"][reg.name]["announced"] is not None
    assert reg.cached().section(reg.name, source="t").latest.version == "2"
    reg.json("status", "--model", reg.name)

    body = {"models": {reg.name: {"name": reg.name, "version": "1", "selector": "latest", "source": "file",
                                  "wanted": {"version": "2", "reason": "gate refused it"}}}}
    with MisbehavingLayer().running() as service:
        service.body = json.dumps(body).encode()
        stale = reg.json("status", "--model", reg.name, "--service", service.url, code=1)
        assert [(d["layer"], d["selector"], d["holds"], d["mlflow"]) for d in stale["disagreements"]] == [("service", "latest", "1", "2")]
        assert any(p["layer"] == "service" and "wants version 2" in p["reason"] for p in stale["problems"])
        assert "service" in reg.table("status", "--model", reg.name, "--service", service.url, code=1)
    gone = reg.json("status", "--model", reg.name, "--service", service.url, code=1)  # stopped: unreachable
    assert gone["layers"]["service"]["state"] == "unreachable" and gone["disagreements"] == []


@pytest.mark.slow
def test_resolve_prints_record_and_trail(reg: Registry):
    first = reg.publish(seed=1, f1=0.80)
    resolved = reg.json("resolve", reg.name, "--selector", "best")
    assert resolved["ok"] and resolved["record"]["version"] == "1" and resolved["record"]["sha256"] == first.sha256
    assert [(a["source"], a["outcome"]) for a in resolved["trail"]] == [("redis", "hit")]
    reg.redis.delete(reg.cache_key)
    again = reg.json("resolve", reg.name)
    assert [(a["source"], a["outcome"]) for a in again["trail"]] == [("redis", "miss"), ("mlflow", "hit")]
    assert "trail" in reg.table("resolve", reg.name)
    # Read-only: the MLflow hit was written neither to the cache nor to the backup.
    backup_before = reg.settings.backup_path.read_bytes()
    assert reg.json("resolve", reg.name)["trail"][-1]["source"] == "mlflow"
    assert reg.redis.exists(reg.cache_key) == 0 and reg.settings.backup_path.read_bytes() == backup_before

    missing = unique("cli_nothing")
    failed = reg.json("resolve", missing, code=1)
    assert not failed["ok"] and missing in failed["error"]
    assert [(a["source"], a["outcome"]) for a in failed["trail"]][-2:] == [("mlflow", "miss"), ("file", "miss")]
    assert "[redis: miss; mlflow: miss" in reg.table("resolve", missing, code=1)  # the message's brackets are text, not markup
    assert reg.run("resolve", reg.name, "--selector", "v1").exit_code == 2  # a reserved alias name: usage
    assert reg.run("resolve", "no/such").exit_code == 2


@pytest.mark.slow
def test_promote_moves_the_alias_in_mlflow_and_refreshes_the_cache(reg: Registry, mlflow_srv):
    reg.publish(seed=1, f1=0.70)
    reg.publish(seed=2, f1=0.60)
    client = MLflowRegistrySource(mlflow_srv.url).client
    assert client.get_registered_model(f"security_{reg.name}").aliases == {"best": "1"}

    promoted = reg.json("promote", reg.name, "2")
    assert (promoted["alias"], promoted["previous"], promoted["version"]) == ("best", "1", "2")
    assert client.get_registered_model(f"security_{reg.name}").aliases == {"best": "2"}
    for payload in (reg.cached(), reg.backup()):
        assert payload.section(reg.name, source="t").best.version == "2"

    assert "-> 1" in reg.table("promote", reg.name, "1", "--alias", "champion")
    assert client.get_registered_model(f"security_{reg.name}").aliases == {"best": "2", "champion": "1"}
    pinned = reg.json("status", "--model", reg.name, env={"REGISTRY_ALIAS": "champion"})
    assert pinned["selectors"] == ["latest", "best", "champion"]
    assert pinned["models"][reg.name]["layers"]["redis"]["champion"] == "1"

    # No such version: the registry says no (1), in one message; MLflow is left as it was.
    missing = reg.json("promote", reg.name, "7", code=1)
    assert missing["ok"] is False and missing["error"] == f"model {reg.name!r} has no version 7 in MLflow (versions: 1, 2)"
    assert client.get_registered_model(f"security_{reg.name}").aliases == {"best": "2", "champion": "1"}
    assert "has no version in MLflow" in reg.json("promote", unique("cli_none"), "1", code=1)["error"]
    assert reg.run("promote", reg.name, "2", "--alias", "latest").exit_code == 2  # reserved by MLflow: usage


@pytest.mark.slow
def test_revoke_deletes_the_version_and_the_cache_drops_it(reg: Registry, mlflow_srv):
    reg.publish(seed=1, f1=0.70)
    reg.publish(seed=2, f1=0.90)
    before = reg.redis.get(reg.cache_key)

    revoked = reg.json("revoke", reg.name, "2")
    assert revoked["deleted"] and revoked["best"] == "1" and revoked["aliases_removed"] == ["best"]
    client = MLflowRegistrySource(mlflow_srv.url).client
    assert [mv.version for mv in client.search_model_versions(f"name = 'security_{reg.name}'")] == ["1"]
    for payload in (reg.cached(), reg.backup()):
        section = payload.section(reg.name, source="t")
        assert [r.version for r in section.versions] == ["1"] and section.best.version == "1"
    reg.json("status", "--model", reg.name)

    reg.redis.set(reg.cache_key, before, ex=3600)  # a cache still holding the revoked version
    stale = reg.json("status", "--model", reg.name, code=1)
    assert ("redis", None, "2") in {(d["layer"], d["selector"], d["holds"]) for d in stale["disagreements"]}
    assert any("which MLflow no longer has" in d["reason"] for d in stale["disagreements"])
    # The registry says no (1): an alias the version does not carry, a version MLflow does not have.
    assert reg.json("revoke", reg.name, "1", "--alias", "champion", code=1)["error"] == (
        f"alias 'champion' of model {reg.name!r} is not on version 1 in MLflow (its aliases: best)")
    assert reg.json("revoke", reg.name, "2", code=1)["error"] == f"model {reg.name!r} has no version 2 in MLflow (versions: 1)"


@pytest.mark.slow
def test_cache_show_and_clear(reg: Registry):
    reg.publish(seed=1, f1=0.70)
    shown = reg.json("cache", "show", "--model", reg.name)
    assert shown["present"] and shown["key"] == reg.cache_key and 0 < shown["ttl_s"] <= 3600
    assert shown["models"] == {reg.name: {"present": True, "latest": "1", "best": "1", "versions": ["1"], "aliases": {"best": "1"},
                                          "sha256": {"1": reg.cached().section(reg.name, source="t").latest.sha256}}}
    assert reg.name in reg.table("cache", "show")

    assert reg.json("cache", "clear") == {"ok": True, "key": reg.cache_key, "deleted": True}
    assert reg.redis.exists(reg.cache_key) == 0
    assert reg.json("cache", "show")["present"] is False
    assert reg.json("cache", "clear")["deleted"] is False
    assert reg.json("cache", "clear", code=2, env={"REGISTRY_REDIS_URL": None})["exit_code"] == 2

    reg.redis.set(reg.cache_key, b"{not json", ex=60)
    assert "unusable" in reg.json("cache", "show", code=1)["error"]
    garbage = reg.json("status", "--model", reg.name, code=1)
    assert [(p["layer"], p["reason"].split(":")[0]) for p in garbage["problems"]] == [("redis", "rejected")]
    down = reg.json("status", "--model", reg.name, code=1, env={"REGISTRY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down["layers"]["redis"]["state"] == "unreachable" and down["disagreements"] == []
    assert "Redis unreachable" in reg.json("cache", "clear", code=1, env={"REGISTRY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})["error"]


@pytest.mark.slow
def test_backup_verify_ok_then_a_tampered_sha256_fails(reg: Registry):
    from runners.artifacts import ArtifactStore

    first = reg.publish(seed=1, f1=0.70)
    second = reg.publish(seed=2, f1=0.90)
    ArtifactStore(reg.settings).fetch(first)  # version 1 is in the local artifact cache, version 2 is not

    ok = reg.json("backup", "verify")
    assert ok["ok"] and ok["shape"] == "ok" and ok["signature"] == "unsigned"
    entries = {(e["model"], e["version"]): e for e in ok["entries"]}
    assert (entries[(reg.name, "1")]["status"], entries[(reg.name, "1")]["where"]) == ("ok", "cache")
    assert (entries[(reg.name, "2")]["status"], entries[(reg.name, "2")]["where"]) == ("ok", "download")
    assert "the backup is usable" in reg.table("backup", "verify")

    tampered = reg.settings.backup_path.read_text().replace(second.sha256, "0" * 64)
    reg.settings.backup_path.write_text(tampered)
    bad = reg.json("backup", "verify", code=1)
    entries = {(e["model"], e["version"]): e for e in bad["entries"]}
    assert entries[(reg.name, "1")]["status"] == "ok"
    assert entries[(reg.name, "2")]["status"] == "mismatch" and entries[(reg.name, "2")]["actual"] == second.sha256
    assert "mismatch" in reg.table("backup", "verify", code=1)
    offline = reg.json("backup", "verify", "--no-download", code=1)
    assert {e["version"]: e["status"] for e in offline["entries"]} == {"1": "ok", "2": "unreachable"}

    reg.settings.backup_path.write_text("[]")
    assert "expected a JSON object" in reg.json("backup", "verify", code=1)["shape"]
    reg.settings.backup_path.unlink()
    assert "no backup file" in reg.json("backup", "verify", code=1)["error"]


@pytest.mark.slow
def test_backup_verify_checks_the_signature(tmp_path: Path, redis_srv, mlflow_srv, s3_srv, cache_key: str):
    reg = Registry(tmp_path, redis_srv.port, mlflow_srv.url, cache_key, unique("cli_signed"), signing_key="k1")
    reg.publish(seed=3, f1=0.70)
    signed = reg.json("backup", "verify")
    assert signed["signature"] == "ok" and [e["status"] for e in signed["entries"]] == ["ok"]
    wrong = reg.json("backup", "verify", "--no-download", code=1, env={"REGISTRY_SIGNING_KEY": "another"})
    assert "signature does not match" in wrong["signature"]
    assert reg.json("backup", "verify", env={"REGISTRY_SIGNING_KEY": None})["signature"].startswith("present, not checked")


@pytest.mark.slow
def test_publish_as_a_subprocess_keeps_stdout_for_json(tmp_path: Path, mlflow_srv, s3_srv):
    save_hf_dir(tmp_path / "hf", seed=5)
    name = unique("cli_publish")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(QUIET_ENV, MLFLOW_TRACKING_URI=mlflow_srv.url, REGISTRY_BACKUP_PATH=str(tmp_path / "backup.json"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "registry", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    published = run("publish", name, "--model-dir", str(tmp_path / "hf"), "--metric", "f1=0.8", "--json")
    assert published.returncode == 0, published.stderr
    body = json.loads(published.stdout)  # MLflow's "View run ..." lines went to stderr
    assert body["record"]["version"] == "1" and body["best_moved"] is True
    status = run("status", "--model", name, "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["models"][name]["layers"]["file"]["latest"] == "1"
    bad = run("publish", name, "--model-dir", str(tmp_path / "hf"), "--metric", "f1=high", "--json")
    assert bad.returncode == 2 and "not a number" in bad.stderr
    assert "it/s" not in published.stderr and "%|" not in published.stderr  # no progress bars


@pytest.mark.slow
def test_an_error_is_one_line_on_stderr(tmp_path: Path, redis_srv, mlflow_srv, s3_srv, cache_key: str):
    """As a new user runs it: the command in a process of its own, stderr read whole."""
    reg = Registry(tmp_path, redis_srv.port, mlflow_srv.url, cache_key, unique("cli_stderr"))
    reg.publish(seed=1, f1=0.70)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(QUIET_ENV, **{k: v for k, v in reg.env.items() if v is not None})
    env["REGISTRY_TRAINING_API_URL"] = f"http://127.0.0.1:{free_port()}"  # a layer that is down

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "registry", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    for args, code, says in ((("promote", reg.name, "7"), 1, "has no version 7"),
                             (("resolve", unique("cli_nothing")), 1, "could be resolved"),
                             (("revoke", reg.name, "3"), 1, "has no version 3")):
        done = run(*args)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == code, done.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr

    # Through MLflow with the cache emptied: the answer on stdout, nothing on stderr (no progress bars, no log lines).
    reg.redis.delete(reg.cache_key)
    resolved = run("resolve", reg.name, "--json")
    assert resolved.returncode == 0, resolved.stderr
    assert [(a["source"], a["outcome"]) for a in json.loads(resolved.stdout)["trail"]][-2:] == [("training_api", "unavailable"), ("mlflow", "hit")]
    assert resolved.stderr.strip() == "", resolved.stderr
