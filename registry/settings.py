"""Settings: read once from the environment into one typed object, then passed down."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from registry.errors import SettingsError

ENV_PREFIX = "REGISTRY_"
#: Values of `REGISTRY_ACCELERATE`: those that ask for nothing, and the accelerations runners/accelerate.py builds.
EAGER_EXECUTION = ("", "none", "eager")
ACCELERATIONS = ("int8", "onnx", "onnx-int8", "openvino", "openvino-int8", "openvino-bf16")
#: Values of `REGISTRY_LONG_TEXT`: how a text longer than the model's window is read (runners/windows.py).
LONG_TEXT_MODES = ("windows", "truncate", "head_tail")
#: Longest input handed to a model, whatever its tokenizer claims (tokens, special tokens included).
MAX_WINDOW_TOKENS = 512
#: Labels that count as benign when `REGISTRY_POSITIVE_LABELS` is unset (compared case-insensitively).
BENIGN_LABELS = ("SAFE", "BENIGN", "LEGITIMATE", "LEGIT", "HAM", "CLEAN", "NORMAL", "NEGATIVE", "OK")


_SECRETS = frozenset({"admin_token", "signing_key", "webhook_secret"})
#: Fields whose environment variable is not REGISTRY_<FIELD>.
_VARIABLES = {"mlflow_tracking_uri": "MLFLOW_TRACKING_URI", "max_batch_size": "REGISTRY_FORWARD_BATCH_SIZE",
              "batch_window": "REGISTRY_BATCH_MAX_TEXTS"}
_S = TypeVar("_S", bound=BaseSettings)


def _shown(field: str, value: Any) -> Any:
    """A rejected value as an error may show it: secrets hidden, passwords in URLs too."""
    if field.lower() in _SECRETS:
        return "***"
    if isinstance(value, str) and "://" in value:
        from registry.redaction import redact_url

        return redact_url(value)
    return value


def check_model_names(names: list[str]) -> list[str]:
    """Model names as MLflow and the artifact cache can hold them; raises ValueError naming the first bad one."""
    for name in names:
        if not MODEL_NAME_RE.fullmatch(name):
            raise ValueError(f"model name {name!r} may hold only ASCII letters, digits, '_', '.' and '-'")
    if len(set(names)) != len(names):
        raise ValueError("a model name is listed twice")
    return names


def load_settings(cls: type[_S], **overrides: Any) -> _S:
    """Build a settings class (prefix REGISTRY_) from the environment; a bad value raises
    SettingsError naming the variable, with secrets and URL passwords hidden."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        # an environment alias already names the variable
        variable = field if field.isupper() else _VARIABLES.get(field, ENV_PREFIX + field.upper())
        raise SettingsError(variable, _shown(field, err.get("input")), err["msg"]) from exc


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


#: What a model name may hold: it becomes an MLflow registered-model name and a directory name.
MODEL_NAME_RE = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.\-]{1,200}")


class GateSpec(BaseModel):
    """The promotion gate of one model: a labelled set every candidate version must classify well."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path
    """JSONL file, one `{"text": ..., "label": ...}` per line."""
    min_accuracy: float = Field(0.0, ge=0, le=1)
    """Accuracy on the set a version must reach."""
    max_drop: Optional[float] = Field(None, ge=0, le=1)
    """How much worse than the serving version on the same set a new version may be; unset = not compared."""


class RegistrySettings(BaseSettings):
    """Every knob of the registry plugin (chain, trust, follow, reload bus, runners and batching);
    `REGISTRY_<FIELD>` in the environment. A service's own limits live with the service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True)

    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Model names to serve (comma-separated), e.g. `prompt_injection,phishing`."""

    alias: str = "latest"
    """Selector used at start-up: `latest`, `best`, another MLflow alias, or an exact version."""

    redis_url: Optional[str] = None
    """Redis URL (`redis://`, `rediss://`, or `redis+sentinel://host:26379,host:26380/mymaster/0`; password in the
    URL); unset turns the cache layer and the Redis reload bus off."""

    cache_key: str = "model_registry"
    """Redis key holding the registry payload."""

    cache_ttl: int = Field(3600, gt=0)
    """Seconds a payload written to Redis lives."""

    redis_timeout: float = Field(0.5, gt=0)
    """Seconds for a Redis connect or command before the layer counts as unavailable."""

    training_api_url: Optional[str] = None
    """Base URL of the training service (`GET /models/latest`); unset turns the layer off."""

    training_api_timeout: float = Field(2.0, gt=0)
    """Seconds for a training API request."""

    mlflow_tracking_uri: Optional[str] = Field(None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "REGISTRY_MLFLOW_TRACKING_URI"))
    """MLflow tracking/registry URI (`MLFLOW_TRACKING_URI`); unset turns the MLflow layer off."""

    mlflow_prefix: str = "security_"
    """Registered model name = prefix + model name."""

    mlflow_timeout: float = Field(3.0, gt=0)
    """Seconds for one MLflow REST request (sets `MLFLOW_HTTP_REQUEST_TIMEOUT` unless that is set)."""

    mlflow_retries: int = Field(1, ge=0)
    """Retries of one MLflow REST request (sets `MLFLOW_HTTP_REQUEST_MAX_RETRIES` unless that is set); the chain is the fallback."""

    breaker_failures: int = Field(3, ge=1)
    """Failures in a row after which a layer is not asked until `REGISTRY_BREAKER_RESET` seconds pass."""

    breaker_reset: float = Field(30.0, gt=0)
    """Seconds a tripped layer is left alone before one call probes it again."""

    s3_timeout: float = Field(10.0, gt=0)
    """Seconds for an S3 connect or read when the runner downloads an artifact directly."""

    backup_path: Path = Path("data/model_registry.json")
    """JSON file backup of the registry payload."""

    fallback_models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """JSON object: model name -> Hugging Face directory or hub id used when no registry layer answers."""

    artifact_cache: Path = Path("data/artifacts")
    """Local directory of downloaded artifacts, keyed by name, version and digest."""

    admin_token: Optional[SecretStr] = None
    """Bearer token for `/reload`; unset refuses every reload (403)."""

    workers: int = Field(1, ge=1)
    """BentoML worker processes of the service (read when `service.py` is imported, also when a built bento is served)."""

    signing_key: Optional[SecretStr] = None
    """HMAC-SHA256 key for registry payloads; unset = unsigned."""

    allowed_uris: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """URI prefixes a model may come from (comma-separated), e.g. `models:/,s3://artifacts/`; unset = any."""

    allow_pickle: bool = False
    """Load pickle-format artifacts whose digest is unknown."""

    forward_batch_size: int = Field(8, ge=1, validation_alias=AliasChoices(
        "REGISTRY_FORWARD_BATCH_SIZE", "REGISTRY_MAX_BATCH_SIZE", "forward_batch_size", "max_batch_size"))
    """Most model inputs in one forward pass (texts and the windows of long texts; inputs of similar length
    are grouped; on CPU small groups win). `REGISTRY_MAX_BATCH_SIZE`, its former name, is still read."""

    batch_max_texts: int = Field(32, ge=1, validation_alias=AliasChoices(
        "REGISTRY_BATCH_MAX_TEXTS", "REGISTRY_BATCH_WINDOW", "batch_max_texts", "batch_window"))
    """Most texts the batcher gathers from queued requests at once, before grouping them by length; a long
    text counts as the windows it will be read in. `REGISTRY_BATCH_WINDOW`, its former name, is still read."""

    forward_threads: Optional[int] = Field(None, ge=1)
    """Forward passes a worker runs at once, each on its own batch, all on one copy of the model.
    Unset or `auto`: 1 on a GPU; on a CPU 2 when the worker's share of the CPUs is 2 or more, else 1 (with
    `REGISTRY_WORKERS=2` on 2 cores: 1 lane per worker)."""

    torch_threads: Optional[int] = Field(None, ge=1)
    """Torch threads of each forward pass. Unset or `auto`: the worker's share of the CPUs
    (the CPUs this process may use, a cgroup v1 or v2 CPU quota included, divided by the workers)
    divided by the forward threads; with both `auto`, workers x forward threads x torch threads
    does not exceed the CPUs."""

    batch_wait_ms: float = Field(0.0, ge=0)
    """Extra milliseconds a batch waits for more requests; 0 = take what queued while the model was busy."""

    reload_dir: Optional[Path] = None
    """Directory of the local reload bus (used without Redis); unset: a temporary directory private to this service run."""

    reload_ack_timeout: float = Field(120.0, gt=0)
    """Seconds a reload waits for the other workers to acknowledge."""

    retry_interval: float = Field(10.0, gt=0)
    """Seconds between start-up resolution attempts while a model cannot be loaded, and between revalidations of stale records."""

    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    """Level of the service's own loggers (service, registry, runners, serving, training)."""

    log_format: str = Field("text", pattern="^(text|json)$")
    """`text` (default) or `json`: one JSON object per line with time, level, logger, tag, model, version, layer, message."""

    follow: bool = True
    """Roll to what the configured selector resolves to whenever the registry changes; `false`: only `/reload`."""

    poll_interval: float = Field(60.0, gt=0)
    """Seconds between reconcile polls of the authority (MLflow); one poll per interval per reload bus."""

    webhook_secret: Optional[SecretStr] = None
    """Secret of MLflow's registry webhooks; `POST /registry/webhook` verifies every delivery with it, and is off (404) without it."""

    webhook_tolerance: float = Field(300.0, gt=0)
    """Seconds a webhook's `X-MLflow-Timestamp` may be away from now before the delivery is refused."""

    health_detail: str = Field("token", pattern="^(token|open)$")
    """Who sees the operator's detail of `GET /models` and `GET /registry/health` (trails, records, every layer's
    answer): `token` (default) only a request with `Authorization: Bearer $REGISTRY_ADMIN_TOKEN`, everyone else the
    summary; `open`: everyone."""

    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    """Largest request body in bytes (Content-Length, or counted while a chunked body streams in); a larger one is
    refused with 413 before it is read. The default fits 256 texts of 20,000 characters sent as `\\uXXXX` escapes."""

    gate: Annotated[dict[str, GateSpec], NoDecode] = Field(default_factory=dict)
    """JSON: model -> {"path": JSONL of {"text", "label"}, "min_accuracy", "max_drop"}; a version that fails never serves."""

    cache_compress_above: int = Field(0, ge=0)
    """Bytes above which the Redis cache value is gzip'ed (signed JSON, then gzip); 0 = never. Readers detect it."""

    accelerate: str = Field("none", pattern=f"^({'|'.join(EAGER_EXECUTION + ACCELERATIONS)})$")
    """Opt-in faster execution of a transformers model: `int8` (torch dynamic quantization of its Linear layers);
    `onnx` / `onnx-int8` (ONNX Runtime, transformer graph fusion, int8 weights); `openvino` / `openvino-int8`
    (OpenVINO CPU, int8 weights); `openvino-bf16` (OpenVINO computing in bfloat16, on a CPU with bf16 units such
    as AMX or AVX512-BF16, refused on one without; the fastest form measured, on AMX). The ONNX and OpenVINO forms
    need `pip install '.[accelerate]'` (the bento and its image carry the OpenVINO forms only) and are converted
    once at load, cached beside the artifact. Serves only after agreeing with the eager model at load (gate set,
    else warm-up texts); else eager serves and `/models` says why."""

    accelerate_max_diff: float = Field(0.05, ge=0)
    """Largest class-probability difference from the eager model the `REGISTRY_ACCELERATE` parity check allows."""

    long_text: str = "windows"
    """How a text longer than the model's window is read. `windows` (default): all of it, in overlapping
    windows, each classified; the text's answer is the window scoring highest on a positive label.
    `truncate`: its first window only. `head_tail`: its first quarter-window and the rest from its end.
    Every answer says what was read (`windows`, `span`, `truncated`)."""

    window_tokens: Optional[int] = Field(None, ge=8, le=MAX_WINDOW_TOKENS)
    """Tokens in one window, special tokens included. Unset: the model's own limit (its tokenizer's
    `model_max_length`), at most 512. A value above a model's limit is lowered to it."""

    window_stride: Optional[int] = Field(None, ge=1)
    """Tokens from one window's start to the next (less than the window, so windows overlap by the rest).
    Unset: three quarters of the window's text tokens."""

    positive_labels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Labels (comma-separated) whose probability makes a window win in `windows` mode, e.g.
    `INJECTION,PHISHING`. Unset: every label of the model but the benign ones. A model with none of them fails to load."""

    benign_labels: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(BENIGN_LABELS))
    """Labels (comma-separated, any case) that are not positive when `REGISTRY_POSITIVE_LABELS` is unset."""

    @field_validator("redis_url", "training_api_url", "mlflow_tracking_uri", "admin_token", "signing_key", "reload_dir",
                     "webhook_secret", "window_tokens", "window_stride", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # A variable declared but left empty (bento `envs`, compose files) means "not set".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("forward_threads", "torch_threads", mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    @field_validator("models", "allowed_uris", "positive_labels", "benign_labels", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: Optional[str]) -> Optional[str]:
        # Checked here, when the service module is imported, so a bad URL stops `bentoml serve`
        # at once instead of every worker failing in a restart loop.
        if value is None:
            return value
        from registry.redis_client import is_sentinel_url, parse_sentinel_url

        if is_sentinel_url(value):
            parse_sentinel_url(value)  # raises SettingsError naming REGISTRY_REDIS_URL, password hidden
        elif value.split("://", 1)[0].lower() not in ("redis", "rediss", "unix"):
            raise ValueError("use redis://, rediss://, unix:// or redis+sentinel:// (rediss+sentinel://)")
        return value

    @field_validator("long_text")
    @classmethod
    def _long_text_mode(cls, value: str) -> str:
        if value.strip().lower() not in LONG_TEXT_MODES:
            raise ValueError(f"use one of {', '.join(LONG_TEXT_MODES)}")
        return value.strip().lower()

    @field_validator("window_stride")
    @classmethod
    def _stride_below_window(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        window = info.data.get("window_tokens") or MAX_WINDOW_TOKENS
        if value is not None and value >= window:
            raise ValueError(f"must be less than the window ({window} tokens{'' if info.data.get('window_tokens') else ', the most a window holds'}),"
                             " so that windows overlap")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        return check_model_names(value)

    @field_validator("fallback_models", "gate", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else {}
        return value

    @field_validator("alias")
    @classmethod
    def _selector(cls, value: str) -> str:
        from registry.record import Selector

        Selector.parse(value)
        return value

    def model_post_init(self, context: Any) -> None:
        # Whatever holds a credential is hidden from every answer, log line and command output from now on.
        from registry.redaction import register_environment, register_secret, register_url

        for secret in (self.admin_token, self.signing_key, self.webhook_secret):
            register_secret(secret)
        for url in (self.redis_url, self.training_api_url, self.mlflow_tracking_uri):
            register_url(url)
        register_environment()

    @classmethod
    def from_env(cls, **overrides: Any) -> "RegistrySettings":
        """Build settings from the environment; a bad value raises SettingsError naming the variable."""
        return load_settings(cls, **overrides)

    def registered_name(self, model: str) -> str:
        return f"{self.mlflow_prefix}{model}"
