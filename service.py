"""The BentoML service: classify with the version the registry chain chose, reload it without a gap.

    bentoml serve service:SecurityClassifier

Routes: POST /classify (BentoML API, in the OpenAPI at /docs.json); POST /reload, GET /models,
GET /registry/health, POST /registry/webhook (a FastAPI app mounted on the service); BentoML's
/readyz, /livez, /metrics. The registry work (resolve, load, gate, swap, follow) is `ModelHost`'s.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Optional

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from registry.coordination import CoordinationError
from registry.errors import (
    GateRefused,
    ModelNotLoaded,
    ModelNotResolvable,
    ReloadFailed,
    SelectorError,
    UnknownModel,
)
from registry.record import Selector
from registry.settings import RegistrySettings
from runners.host import ModelHost

logger = logging.getLogger("service")


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class ReloadRequest(BaseModel):
    """Body of POST /reload: which model (default: every configured model) and which version."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = Field(None, max_length=200)
    alias: Optional[StrictStr] = Field(None, max_length=300)
    version: Optional[StrictInt | StrictStr] = None  # strict: `true` or `1.0` is not version 1


admin_app = FastAPI(title="registry admin", docs_url=None, redoc_url=None, openapi_url=None)


@admin_app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


@admin_app.exception_handler(RequestValidationError)
async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input back, which fails for lone surrogates, NaN or raw
    # bytes (a 500); name the field and the problem only, in ASCII.
    def clean(value: object) -> str:
        return str(value).encode("ascii", "backslashreplace").decode("ascii")

    problems = [{"loc": [clean(part) for part in e.get("loc", ())], "msg": clean(e.get("msg", "")), "type": clean(e.get("type", ""))}
                for e in exc.errors()]
    first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
    return JSONResponse({"error": f"invalid request body at {'.'.join(first['loc']) or 'body'}: {first['msg']}", "detail": problems},
                        status_code=400)


class JSONOnly:
    """Answer 415 to a non-JSON body on the JSON APIs (BentoML turns a bad multipart body into a 500)."""

    JSON_ROUTES = ("/classify", "/reload")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in self.JSON_ROUTES:
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if content_type and content_type != "application/json" and not content_type.endswith("+json"):
                response = error(415, f"expected an application/json body, got {content_type!r}")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@bentoml.service(
    name="security_classifier",
    # BentoML reads `workers` when this module is imported (and freezes it into a bento at build
    # time): the one setting read at import, through the same settings object as everything else.
    workers=RegistrySettings.from_env().workers,
    traffic={"timeout": 300, "max_concurrency": 512},
)
@bentoml.asgi_app(admin_app, path="/")
class SecurityClassifier:
    """Serves each configured model at the version the registry chain resolves, and follows the registry."""

    def __init__(self) -> None:
        self.host = ModelHost().start()
        self.settings = self.host.settings

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.host.stop()

    # -- readiness --------------------------------------------------------------------------------
    def __is_ready__(self) -> bool:
        if self.host.ready():
            return True
        raise HTTPException(status_code=503, detail=f"not ready: {self.host.manager.not_ready_reason()}")

    # -- the hot path -----------------------------------------------------------------------------
    @bentoml.api(route="/classify")
    async def classify(self, texts: list[str], model: Optional[str] = None) -> dict[str, Any]:
        """Classify texts; the answer names the model version that produced the predictions."""
        # Errors are returned, not raised: BentoML hides the message of a raised 5xx, and the
        # 503 of a model that is not loaded must say why.
        problem = self._invalid(texts)
        if problem:
            return error(400, problem)
        try:
            served = self.host.get(model)  # the snapshot this request keeps until it answers
        except UnknownModel as exc:
            return error(404, str(exc))
        except ModelNotLoaded as exc:
            return error(503, str(exc))
        predictions = await served.batcher.predict(texts)
        return {"model": served.identity(), "predictions": predictions}

    def _invalid(self, texts: list[str]) -> Optional[str]:
        limits = self.settings
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

    # -- admin and introspection (FastAPI, mounted) -----------------------------------------------
    @admin_app.get("/models")
    def models(self) -> JSONResponse:
        return JSONResponse(self.host.models())

    @admin_app.get("/registry/health")
    def registry_health(self) -> JSONResponse:
        return JSONResponse(self.host.health())

    @admin_app.post("/registry/webhook")
    async def registry_webhook(self, request: Request) -> JSONResponse:
        """MLflow's registry webhook: verified with REGISTRY_WEBHOOK_SECRET, acted on in the background."""
        body = await request.body()
        status, answer = self.host.follower.webhook(request.headers, body)
        return JSONResponse(answer, status_code=status)

    @admin_app.post("/reload")
    def reload(self, request: Request, body: Optional[ReloadRequest] = None) -> JSONResponse:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        body = body or ReloadRequest()
        try:
            selector = Selector.from_request(body.alias, body.version, default=self.settings.alias)
        except SelectorError as exc:
            return error(400, str(exc))
        names = [body.model] if body.model else self.host.names
        unknown = [n for n in names if n not in self.host.names]
        if unknown:
            return error(404, str(UnknownModel(unknown[0], self.host.names)))
        client = request.client.host if request.client else "?"
        logger.info("[HYBRID] reload requested by %s (%s): models %s, selector %s", client,
                    request.headers.get("user-agent", "-"), names, selector)
        results = []
        for name in names:
            try:
                results.append(self.host.rollout(name, selector, trigger="reload"))
            except ModelNotResolvable as exc:
                return error(404, str(exc), model=name, trail=[a.to_dict() for a in exc.trail], done=results)
            except ReloadFailed as exc:
                status = 404 if isinstance(exc.__cause__, ModelNotResolvable) else 422
                trail = [a.to_dict() for a in exc.__cause__.trail] if isinstance(exc.__cause__, ModelNotResolvable) else []
                extra = {"gate": exc.figures} if isinstance(exc, GateRefused) else {}
                return error(status, str(exc), model=name, trail=trail, done=results, **extra)
            except CoordinationError as exc:
                return error(503, f"reload coordination failed: {exc}", model=name, done=results)
        return JSONResponse(results[0] if body.model or len(results) == 1 else {"reloads": results})

    def _authorize(self, request: Request) -> Optional[JSONResponse]:
        token = self.settings.admin_token
        if token is None:
            return error(403, "reload is disabled: REGISTRY_ADMIN_TOKEN is not set on the service")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # constant-time comparison of bytes; a missing header compares against nothing
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
            client = request.client.host if request.client else "?"
            logger.warning("[HYBRID] reload refused for %s: %s", client, "missing token" if not header else "wrong token")
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None


SecurityClassifier.add_asgi_middleware(JSONOnly)
