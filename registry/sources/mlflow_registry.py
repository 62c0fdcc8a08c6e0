"""MLflow Model Registry layer: the authoritative record of versions, aliases and metrics.

One `search_model_versions` call per model answers every selector and yields the model's whole
section for write-back. The publisher stores `sha256`, `artifact_uri` and the metrics as version
tags so that this single call carries everything; versions registered by other tools (no tags)
get their metrics and storage location with one or two extra calls, for the selected record only.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import TYPE_CHECKING, Any, Optional

from registry.errors import SourceUnavailable
from registry.redaction import redact_text
from registry.mlflow_env import configure_mlflow_http
from registry.payload import ModelSection, RegistryPayload
from registry.record import ModelRecord, Selector
from registry.settings import RegistrySettings
from registry.sources.base import Answer, LayerHealth, RegistrySource, section_summary

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

#: Version tags written by the publisher.
TAG_SHA256 = "registry.sha256"
TAG_ARTIFACT_URI = "registry.artifact_uri"
TAG_METRICS = "registry.metrics"

_NAME_RE = re.compile(r"^[\w.\-]+$")


def _tag_metrics(tags: dict[str, str]) -> dict[str, float]:
    try:
        data = json.loads(tags.get(TAG_METRICS, "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MLflowRegistrySource(RegistrySource):
    """Registered model `<prefix><name>`; the client is created lazily (importing mlflow costs seconds)."""

    source_id = "mlflow"
    tag = "[MLFLOW]"
    live_registry = True
    write_back = True
    authority = True

    def __init__(self, tracking_uri: str, *, prefix: str = "security_", timeout: float = 2.0, retries: int = 1):
        super().__init__()
        self.tracking_uri = tracking_uri
        self.prefix = prefix
        configure_mlflow_http(timeout, retries)
        self._client: Optional["MlflowClient"] = None

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> Optional["MLflowRegistrySource"]:
        if not settings.mlflow_tracking_uri:
            return None
        return cls(settings.mlflow_tracking_uri, prefix=settings.mlflow_prefix, timeout=settings.mlflow_timeout, retries=settings.mlflow_retries)

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def registered_name(self, name: str) -> str:
        if not _NAME_RE.match(name):
            raise ValueError(f"model name {name!r} may hold only letters, digits, '_', '.', '-'")
        return f"{self.prefix}{name}"

    def _call(self, what: str, fn: Any, *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """Run one client call; connectivity and server errors become SourceUnavailable.

        With `missing_ok`, "does not exist" answers None: a definite no, not a failure.
        """
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if missing_ok and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise SourceUnavailable(self.source_id, f"{what}: {exc.error_code}: {redact_text(str(exc.message))[:300]}") from exc
        except Exception as exc:  # requests / sqlalchemy errors surface raw from some stores
            raise SourceUnavailable(self.source_id, f"{what}: {type(exc).__name__}: {redact_text(str(exc))[:300]}") from exc

    def _record(self, name: str, mv: "ModelVersion", aliases: list[str]) -> ModelRecord:
        tags = dict(mv.tags or {})
        created = mv.creation_timestamp
        return ModelRecord(
            name=name,
            version=str(mv.version),
            model_uri=f"models:/{mv.name}/{mv.version}",
            artifact_uri=tags.get(TAG_ARTIFACT_URI),
            run_id=mv.run_id or None,
            metrics=_tag_metrics(tags),
            aliases=tuple(sorted(set(aliases) | set(mv.aliases or ()))),
            sha256=tags.get(TAG_SHA256) or None,
            source=self.source_id,
            created_at=None if created is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created / 1000)),
        )

    def _section(self, name: str, aliases: dict[str, Any], versions: list["ModelVersion"]) -> Optional[ModelSection]:
        # Version entities from a search do not carry aliases on every store; the model does.
        by_version: dict[str, list[str]] = {}
        for alias, version in (aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        records = [
            self._record(name, mv, by_version.get(str(mv.version), []))
            for mv in versions
            if str(getattr(mv, "status", "READY")) in ("READY", "")
        ]
        return ModelSection.from_records(name, records) if records else None

    def _search_versions(self, filter_string: str) -> list["ModelVersion"]:
        out: list["ModelVersion"] = []
        token = None
        while True:
            page = self._call(
                "search_model_versions", self.client.search_model_versions, filter_string=filter_string, max_results=10_000, page_token=token
            )
            out.extend(page)
            token = getattr(page, "token", None)
            if not token:
                return out

    def section(self, name: str) -> Optional[ModelSection]:
        """Every READY version of the model, with aliases; None when the model is not registered."""
        registered = self.registered_name(name)
        model = self._call("get_registered_model", self.client.get_registered_model, registered, missing_ok=True)
        if model is None:
            return None
        return self._section(name, model.aliases, self._search_versions(f"name = '{registered}'"))

    def _complete(self, record: ModelRecord, registered: str) -> ModelRecord:
        """Fill what a version registered without our tags lacks: metrics and the storage location."""
        changes: dict[str, Any] = {}
        if not record.metrics and record.run_id:
            run = self._call("get_run", self.client.get_run, record.run_id)
            changes["metrics"] = dict(run.data.metrics)
        if not record.artifact_uri:
            changes["artifact_uri"] = self._call(
                "get_model_version_download_uri", self.client.get_model_version_download_uri, registered, record.version
            )
        return dataclasses.replace(record, **changes) if changes else record

    def select(self, section: Optional[ModelSection], name: str, selector: Selector) -> Optional[ModelRecord]:
        """The record the selector names in a section read from this registry, completed; None when there is none."""
        record = section.select(selector, custom_aliases=True) if section is not None else None
        return None if record is None else self._complete(record, self.registered_name(name))

    def lookup(self, name: str, selector: Selector) -> Optional[Answer]:
        section = self.section(name)
        record = self.select(section, name, selector)
        return None if record is None else Answer(record, section)

    def payload(self, names: Optional[list[str]] = None) -> RegistryPayload:
        """The whole registry payload, in two calls: every `<prefix>*` model, then every version."""
        models = []
        token = None
        while True:
            page = self._call(
                "search_registered_models", self.client.search_registered_models,
                filter_string=f"name LIKE '{self.prefix}%'", max_results=1000, page_token=token,
            )
            models.extend(page)
            token = getattr(page, "token", None)
            if not token:
                break
        versions_by_model: dict[str, list["ModelVersion"]] = {}
        for mv in self._search_versions(f"name LIKE '{self.prefix}%'"):
            versions_by_model.setdefault(mv.name, []).append(mv)
        sections = (
            self._section(model.name[len(self.prefix):], model.aliases, versions_by_model.get(model.name, []))
            for model in models
            # LIKE reads `_` in the prefix as a wildcard: keep only names that really start with it.
            if model.name.startswith(self.prefix) and (names is None or model.name[len(self.prefix):] in names)
        )
        return RegistryPayload.from_sections((s for s in sections if s is not None), where="mlflow")

    def health(self, models: list[str]) -> LayerHealth:
        start = time.perf_counter()
        out: dict[str, Any] = {}
        try:
            for name in models:
                out[name] = section_summary(self.section(name))
        except SourceUnavailable as exc:
            return LayerHealth(self.source_id, False, (time.perf_counter() - start) * 1000, exc.reason)
        return LayerHealth(self.source_id, True, (time.perf_counter() - start) * 1000, redact_text(self.tracking_uri), out)
