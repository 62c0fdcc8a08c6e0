"""deploy/: the Kubernetes manifests validate offline against Kubernetes' own schemas (strict), and
the compose file is checked for what `docker compose config` would refuse and what this project
needs (no Docker engine here). Every variable they hand a service of this repository is one of its
settings; the one-shot scripts and MLflow's configuration run for real against local servers.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import httpx
import kubernetes_validate
import pytest
import yaml

from registry.settings import RegistrySettings
from tests.servers import QUIET_ENV, VENV_BIN, ManagedServer, free_port, http_ok, s3_server
from tests.test_bento import setting_fields

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
README = REPO / "README.md"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"
#: The Kubernetes version the manifests are validated for (the newest kubernetes-validate knows).
K8S_VERSION = "1.37"

#: Variables a repository service may be handed that are not its own settings: S3 and MLflow's own.
EXTERNAL = {"MLFLOW_S3_ENDPOINT_URL", "MLFLOW_DISABLE_TELEMETRY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION"}
SECRETS = {"REGISTRY_ADMIN_TOKEN", "REGISTRY_WEBHOOK_SECRET", "REGISTRY_SIGNING_KEY"}


def known_settings() -> set[str]:
    return set(setting_fields())


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[name.lower().replace("_", "-")] = version
    return pins


def built_image() -> str:
    """The image `make container` builds: its name and tag live in deploy/container/build alone."""
    result = subprocess.run([str(DEPLOY / "container" / "build"), "--print-image"], capture_output=True, text=True,
                            timeout=30, env={k: v for k, v in os.environ.items() if k != "CLASSIFIER_IMAGE"})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# --- Kubernetes ------------------------------------------------------------------------------------

def k8s_documents(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.fixture(scope="module")
def applied() -> dict[str, dict[str, Any]]:
    """What `kubectl apply -f deploy/kubernetes/` applies, by kind (one of each)."""
    by_kind: dict[str, dict[str, Any]] = {}
    for path, doc in k8s_documents(K8S):
        assert doc["kind"] not in by_kind, f"{path}: a second {doc['kind']}"
        by_kind[doc["kind"]] = doc
    return by_kind


@pytest.fixture(scope="module")
def secret_example() -> dict[str, Any]:
    (only,) = [doc for _, doc in k8s_documents(K8S / "examples")]
    return only


def test_every_manifest_validates_strictly_against_the_kubernetes_schemas() -> None:
    docs = k8s_documents(K8S) + k8s_documents(K8S / "examples")
    assert {doc["kind"] for _, doc in docs} == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Secret"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{path.relative_to(REPO)} ({doc['kind']}): {exc.message} at {list(exc.path)}") from None


def test_strict_validation_refuses_what_kubectl_would(applied: dict[str, dict[str, Any]]) -> None:
    """The validator is not a rubber stamp: a misspelt field, a wrong type and a missing field fail."""
    misspelt = copy.deepcopy(applied["Deployment"])
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    wrong_type = copy.deepcopy(applied["Service"])
    wrong_type["spec"]["ports"][0]["port"] = "three thousand"
    missing = copy.deepcopy(applied["Deployment"])
    del missing["spec"]["selector"]
    for doc in (misspelt, wrong_type, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubectl_apply_of_the_directory_applies_no_placeholder_secret() -> None:
    kinds = {doc["kind"] for _, doc in k8s_documents(K8S)}
    assert "Secret" not in kinds, "the example Secret would overwrite the real one on every apply"
    assert not list(K8S.glob("kustomization.*")), "kubectl apply -f would send a Kustomization to the API"


def test_deployment_probes_env_and_resources(applied: dict[str, dict[str, Any]], secret_example: dict[str, Any]) -> None:
    deployment, config, service, pdb = (applied[k] for k in ("Deployment", "ConfigMap", "Service", "PodDisruptionBudget"))
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], "a PDB as large as the Deployment blocks every drain"

    (container,) = pod["spec"]["containers"]
    assert container["image"] == built_image(), "deploy/kubernetes names another image than make container builds"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in [m["mountPath"] for m in container["volumeMounts"]], "a read-only root needs a writable /tmp"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 3000}  # BentoML's port
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]

    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and isinstance(security["runAsUser"], int), "the kubelet cannot check a named USER"

    # settings from the ConfigMap, the three secrets from the Secret (present in the example)
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert SECRETS <= from_secret.keys()
    for name, ref in from_secret.items():
        assert ref["name"] == secret_example["metadata"]["name"], name
        assert ref.get("optional") or ref["key"] in secret_example["stringData"], name
    for name in SECRETS:
        assert not from_secret[name].get("optional"), f"{name}: a missing Secret must stop the rollout"
    assert not SECRETS & config["data"].keys(), "secrets in the ConfigMap"

    # the file backup and the artifact cache are on the mounted volume
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    for name in ("REGISTRY_BACKUP_PATH", "REGISTRY_ARTIFACT_CACHE"):
        assert any(config["data"][name].startswith(m + "/") for m in mounts), name


def test_kubernetes_env_is_known_settings_that_parse(applied: dict[str, dict[str, Any]], secret_example: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = applied["ConfigMap"]["data"]
    (container,) = applied["Deployment"]["spec"]["template"]["spec"]["containers"]
    names = set(config) | {e["name"] for e in container["env"]}
    assert names <= known_settings() | EXTERNAL, sorted(names - known_settings() - EXTERNAL)
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values must be strings"

    for name in list(os.environ):
        if name.startswith(("REGISTRY_", "MLFLOW_")):
            monkeypatch.delenv(name)
    for name, value in {**config, **secret_example["stringData"]}.items():
        monkeypatch.setenv(name, value)
    settings = RegistrySettings.from_env()
    assert settings.models == ["prompt_injection"] and settings.redis_url and settings.mlflow_tracking_uri
    assert settings.admin_token and settings.webhook_secret and settings.signing_key


# --- compose ---------------------------------------------------------------------------------------

INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        present = name in env and (env[name] != "" or op not in (":-", ":?"))
        if op in (":?", "?") and not present:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and not present:
            return arg
        return env.get(name, "")

    return INTERPOLATION.sub(one, value)


def required_variables(text: str) -> set[str]:
    return {m.group("braced") for m in INTERPOLATION.finditer(text) if m.group("op") in (":?", "?")}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # YAML merge keys (<<) resolved as compose does


def test_compose_structure(compose: dict[str, Any]) -> None:
    assert set(compose) - {"name", "services", "volumes", "networks", "configs", "secrets"} <= {k for k in compose if k.startswith("x-")}
    services = compose["services"]
    assert {"redis", "minio", "create-bucket", "postgres", "mlflow", "training-api", "classifier-1", "classifier-2"} <= set(services)

    host_ports: list[str] = []
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context.is_dir(), name
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name
        depends = service.get("depends_on") or {}
        for dep, spec in (depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends)):
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec.get("condition", "service_started")
            assert condition in ("service_started", "service_healthy", "service_completed_successfully"), (name, dep)
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot job: restart must be 'no'"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in (compose.get("volumes") or {}), f"{name}: undeclared volume {source}"
        for port in service.get("ports", []):
            host_ports.append(str(port).rsplit(":", 1)[0])
    assert len(host_ports) == len(set(host_ports)), f"host ports used twice: {sorted(host_ports)}"

    # two replicas behind nothing, on 3000 and 3001, of the bento's image
    for name, port in (("classifier-1", "3000:3000"), ("classifier-2", "3001:3000")):
        assert services[name]["ports"] == [port]
        assert services[name]["image"] == f"${{CLASSIFIER_IMAGE:-{built_image()}}}"
    assert services["training-api"]["command"][:3] == ["python", "-m", "training.api"]


def test_compose_hands_repository_services_only_their_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose["services"]
    sample = {name: f"sample-{name.lower()}" for name in required_variables(COMPOSE.read_text())}
    for name in ("classifier-1", "classifier-2", "training-api"):
        env = environment(services[name])
        assert set(env) <= known_settings() | EXTERNAL, f"{name}: {sorted(set(env) - known_settings() - EXTERNAL)}"
        for var in list(os.environ):
            if var.startswith(("REGISTRY_", "MLFLOW_")):
                monkeypatch.delenv(var)
        for var, value in interpolate(env, sample).items():
            monkeypatch.setenv(var, value)
        RegistrySettings.from_env()  # every value parses

    classifier = environment(services["classifier-1"])
    assert classifier == environment(services["classifier-2"])
    assert classifier["REGISTRY_TRAINING_API_URL"] == "http://training-api:8002"
    assert classifier["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert classifier["REGISTRY_REDIS_URL"].startswith("redis://redis:6379")
    assert required_variables(classifier["REGISTRY_ADMIN_TOKEN"] + classifier["REGISTRY_WEBHOOK_SECRET"]) == {
        "REGISTRY_ADMIN_TOKEN", "REGISTRY_WEBHOOK_SECRET"}, "the stack must not start with a known admin token"
    # the classifiers, the training API and the publisher must agree on the signing key
    keys = {environment(services[n]).get("REGISTRY_SIGNING_KEY") for n in ("classifier-1", "classifier-2", "training-api")}
    assert keys == {"${REGISTRY_SIGNING_KEY:-}"}


def test_compose_mlflow_is_configured_with_its_own_variables(compose: dict[str, Any]) -> None:
    import mlflow.environment_variables as mlflow_env
    from mlflow.cli import server

    services = compose["services"]
    mlflow = services["mlflow"]
    env = environment(mlflow)
    known = {v.name for v in vars(mlflow_env).values() if isinstance(v, mlflow_env._EnvironmentVariable)}
    known |= {p.envvar for p in server.params if isinstance(p.envvar, str)}
    assert set(env) <= known | EXTERNAL, sorted(set(env) - known - EXTERNAL)
    assert env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https"
    assert env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://") and "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY" in required_variables(env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"])
    options = {opt for p in server.params for opt in p.opts + p.secondary_opts}
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert {arg for arg in command[2:] if arg.startswith("-")} <= options
    # MinIO's bucket exists before MLflow starts; the bucket job and MLflow's root name the same one
    bucket = services["create-bucket"]["command"][-1]
    assert env["MLFLOW_DEFAULT_ARTIFACT_ROOT"].startswith(f"s3://{bucket}/")
    assert mlflow["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    # the classifiers may load from that bucket
    assert f"s3://{bucket}/" in environment(services["classifier-1"])["REGISTRY_ALLOWED_URIS"].split(",")
    # the webhook job points at a replica, with the classifiers' secret
    hook = environment(services["create-webhook"])
    assert hook["WEBHOOK_URL"] == "http://classifier-1:3000/registry/webhook"
    assert hook["REGISTRY_WEBHOOK_SECRET"] == environment(services["classifier-1"])["REGISTRY_WEBHOOK_SECRET"]


def test_images_pin_what_the_lock_pins() -> None:
    pins = lock_pins()
    mlflow_file = (DEPLOY / "mlflow.Dockerfile").read_text()
    for package in ("mlflow", "boto3"):
        assert f"{package}=={pins[package]}" in mlflow_file, package
    training = (DEPLOY / "training.Dockerfile").read_text()
    assert f"torch=={pins['torch']}" in training
    assert "-c requirements.lock ." in training
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"security-classifier/training:{project['project']['version']}" == \
        yaml.safe_load(COMPOSE.read_text())["services"]["training-api"]["image"]

    # what training.Dockerfile copies exists and is not excluded by its .dockerignore
    ignore = (DEPLOY / "training.Dockerfile.dockerignore").read_text().split()
    for line in training.splitlines():
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (REPO / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    copied = {s for line in mlflow_file.splitlines() if line.startswith("COPY ") for s in shlex.split(line)[1:-1]}
    assert all((DEPLOY / s).is_file() for s in copied), copied


def test_training_api_takes_the_flags_compose_gives_it(compose: dict[str, Any]) -> None:
    command = compose["services"]["training-api"]["command"]
    result = subprocess.run([sys.executable, *command[1:3], "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **QUIET_ENV})
    assert result.returncode == 0, result.stderr
    for flag in (a for a in command if a.startswith("--")):
        assert flag in result.stdout, flag


# --- the compose configuration, run -----------------------------------------------------------------

@pytest.fixture
def compose_mlflow(compose: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """MinIO -> moto, the bucket job, then MLflow started with the compose command and environment;
    only the store (PostgreSQL -> sqlite), the S3 endpoint and the port are swapped."""
    services = compose["services"]
    s3 = s3_server(tmp_path).start()
    try:
        secrets = {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "fF2ZbJq9jT7eH2QvYg3Xk5m8N0pR1sU4wVaBcDeFgHo=",
                   "REGISTRY_WEBHOOK_SECRET": "compose-webhook-secret"}
        s3_env = {**interpolate(environment(services["create-bucket"]), {}), "MLFLOW_S3_ENDPOINT_URL": s3.url}

        # the bucket job, as compose runs it (its script from deploy/)
        job = services["create-bucket"]["command"]
        argv = [sys.executable, str(DEPLOY / Path(job[1]).name), *job[2:]]
        runs = [subprocess.run(argv, env={**os.environ, **s3_env}, capture_output=True, text=True, timeout=120) for _ in range(2)]
        assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
        assert [r.stdout.split(": ")[-1].strip() for r in runs] == ["created", "exists"]

        port = free_port()
        env = {**interpolate(environment(services["mlflow"]), secrets), **QUIET_ENV,
               "MLFLOW_S3_ENDPOINT_URL": s3.url, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db"}
        command = list(services["mlflow"]["command"])
        command[command.index("--port") + 1] = str(port)
        command[command.index("--host") + 1] = "127.0.0.1"
        server = ManagedServer("compose-mlflow", [str(VENV_BIN / "mlflow"), *command[1:]], port, tmp_path, env=env,
                               ready=http_ok(f"http://127.0.0.1:{port}/health"), start_timeout=120)
        server.start()
        try:
            yield {"server": server, "env": env, "secrets": secrets, "s3_env": s3_env}
        finally:
            server.stop()
    finally:
        s3.stop()


@pytest.mark.slow
@pytest.mark.servers
def test_compose_mlflow_answers_the_stack_and_takes_the_webhook(compose: dict[str, Any], compose_mlflow: dict[str, Any]) -> None:
    server = compose_mlflow["server"]
    search = "/api/2.0/mlflow/registered-models/search"
    # the name the other services use for it, and localhost from the host; nothing else
    for host, status in (("mlflow:5000", 200), (f"localhost:{server.port}", 200), ("evil.example:5000", 403)):
        response = httpx.get(server.url + search, headers={"Host": host}, timeout=30)
        assert response.status_code == status, (host, response.status_code, response.text[:200])

    # the webhook job, as compose runs it, twice: created, then updated in place
    hook = compose["services"]["create-webhook"]
    env = {**os.environ, **QUIET_ENV, **interpolate(environment(hook), compose_mlflow["secrets"]), "MLFLOW_TRACKING_URI": server.url}
    argv = [sys.executable, str(DEPLOY / Path(hook["command"][1]).name)]
    first, second = (subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120) for _ in range(2))
    assert first.returncode == 0 and " created: " in first.stdout, first.stdout + first.stderr
    assert second.returncode == 0 and " updated: " in second.stdout, second.stdout + second.stderr

    from mlflow import MlflowClient

    hooks = list(MlflowClient(tracking_uri=server.url, registry_uri=server.url).list_webhooks())
    assert len(hooks) == 1
    assert hooks[0].url == "http://classifier-1:3000/registry/webhook"
    assert {str(e) for e in hooks[0].events} == {"model_version.created", "model_version_alias.created",
                                                 "model_version_alias.deleted"}


# --- the docs -------------------------------------------------------------------------------------------

def docs_section(title: str) -> str:
    text = DEPLOYMENT_DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_docs_show_how_to_run_it_in_production(compose: dict[str, Any]) -> None:
    section = docs_section("Running it in production")
    assert "kubectl apply -f deploy/kubernetes/" in section
    assert "docker compose -f deploy/compose.yaml up" in section
    assert "create-webhook" in section
    for variable in required_variables(COMPOSE.read_text()):
        assert variable in section, f"docs/deployment.md does not say to set {variable}"
    assert "docs/deployment.md" in README.read_text(), "the README links the deployment page"
