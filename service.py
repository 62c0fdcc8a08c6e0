"""The BentoML service: classify with the version the registry chain chose, follow the registry, reload without a gap.

    bentoml serve service:SecurityClassifier

It is the first user of the plugin: the registry work (resolve, load beside, gate, swap, follow,
the reload bus) is `serving.host.ModelHost`'s, and the admin routes (POST /reload, GET /models,
GET /registry/health, POST /registry/webhook) come from `serving.admin.registry_admin`. Its own
route is POST /classify (a BentoML API, in the OpenAPI at /docs.json); BentoML adds /readyz,
/livez and /metrics.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import bentoml

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.responses import JSONResponse

from registry.errors import RegistryError, SettingsError
from registry.redaction import redact
from registry.settings import ENV_PREFIX, RegistrySettings, load_settings
from serving.admin import error, error_response, registry_admin
from serving.host import ModelHost

logger = logging.getLogger("service")


class ClassifierSettings(BaseSettings):
    """The classify route's own settings (what one request may hold, whether it is traced), beside the plugin's."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    max_texts: int = Field(256, ge=1)
    """Most texts in one classify request (`REGISTRY_MAX_TEXTS`)."""

    max_text_chars: int = Field(20_000, ge=1)
    """Most characters in one text of a classify request (`REGISTRY_MAX_TEXT_CHARS`)."""

    trace_classify: bool = False
    """Whether POST /classify goes through OpenTelemetry (`REGISTRY_TRACE_CLASSIFY`). BentoML traces
    every route, but samples nothing unless its `tracing` configuration says so; unsampled, its ASGI
    middleware still builds four spans per request, about a quarter of the event loop's work for
    one classify (measured: 8% more throughput at 32 clients without it). Off: /classify is left out
    of tracing (BentoML's `tracing.excluded_urls`), so its access-log lines carry no trace ids and
    its answers no X-BentoML-Request-ID. Set it to true where BentoML exports traces."""

    @classmethod
    def from_env(cls) -> "ClassifierSettings":
        return load_settings(cls)


def _at_import() -> tuple[RegistrySettings, ClassifierSettings]:
    """The settings BentoML reads when this module is imported; a bad one stops `bentoml serve` with one line naming it."""
    try:
        return RegistrySettings.from_env(), ClassifierSettings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"[HYBRID] cannot start: {exc}") from None


_REGISTRY, _CLASSIFIER = _at_import()


@registry_admin(json_routes=("/classify",))  # the body is checked against classify's signature first
@bentoml.service(
    name="security_classifier",
    # BentoML reads `workers` and `tracing` when this module is imported (and freezes them into a
    # bento at build time): the settings read at import, through the same settings objects as the rest.
    # BentoML's own configuration (BENTOML_CONFIG, BENTOML_CONFIG_OPTIONS) still overrides `tracing`.
    workers=_REGISTRY.workers,
    traffic={"timeout": 300, "max_concurrency": 512},
    tracing={} if _CLASSIFIER.trace_classify else {"excluded_urls": ["/classify$"]},
)
class SecurityClassifier:
    """Serves each model of REGISTRY_MODELS at the version the registry chain resolves, and follows the registry."""

    host = ModelHost()

    def __init__(self) -> None:
        self.limits = ClassifierSettings.from_env()

    @bentoml.api(route="/classify")
    async def classify(self, texts: list[str], model: Optional[str] = None) -> dict[str, Any]:
        """Classify texts; the answer names the model version that produced the predictions."""
        # Errors are returned, not raised: BentoML hides the message of a raised 5xx, and the
        # 503 of a model that is not loaded must say why.
        problem = self._invalid(texts)
        if problem:
            logger.info("[HYBRID] classify refused: %s", problem)
            return error(400, problem)
        try:
            served = self.host.get(model)  # the snapshot this request keeps until it answers
        except RegistryError as exc:  # UnknownModel (404), ModelNotLoaded (503): the error says its status
            return error_response(exc)
        predictions = await served.batcher.predict(texts)
        # A response object passes BentoML by; a dict would be re-validated against the annotation,
        # which builds its JSON schema on every call (8% of the non-model CPU time at 32 clients).
        # The model's URI is the one place of an answer a credential could hide in (a presigned URL).
        return JSONResponse({"model": redact(served.identity()), "predictions": predictions})

    def _invalid(self, texts: list[str]) -> Optional[str]:
        limits = self.limits
        if not texts:
            return "'texts' must be a non-empty list of strings"
        if len(texts) > limits.max_texts:
            return f"'texts' holds {len(texts)} texts; at most {limits.max_texts} per request"
        for i, text in enumerate(texts):
            if not text.strip():
                return f"texts[{i}] is empty"
            if len(text) > limits.max_text_chars:
                return f"texts[{i}] has {len(text)} characters; at most {limits.max_text_chars} per text"
        return None
