"""The BentoML service: classify with the version the registry chain chose, reload it without a gap.

    bentoml serve service:SecurityClassifier

Routes: POST /classify (BentoML API, in the OpenAPI at /docs.json); POST /reload, GET /models,
GET /registry/health (a FastAPI app mounted on the service); BentoML's /readyz, /livez, /metrics.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from typing import Any, Optional

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from registry.coordination import CoordinationError, ReloadBus, worker_id
from registry.errors import (
    ModelNotLoaded,
    ModelNotResolvable,
    ReloadFailed,
    SelectorError,
    UnknownModel,
)
from registry.record import Selector
from registry.resolver import Resolver
from registry.settings import RegistrySettings
from runners.manager import ModelManager

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
    """Serves each configured model at the version the registry chain resolves."""

    def __init__(self) -> None:
        self.settings = RegistrySettings.from_env()
        # BentoML's handlers pass WARNING and up from other loggers; our INFO lines (the final
        # choice of each resolution, swaps, reloads) are part of the product.
        for name in ("service", "registry", "runners"):
            logging.getLogger(name).setLevel(self.settings.log_level)
        import torch

        torch.set_num_threads(self.settings.torch_threads)
        self.worker = worker_id()
        self.resolver = Resolver.from_settings(self.settings)
        self.manager = ModelManager(self.settings, self.resolver)
        self.bus = ReloadBus.from_settings(self.settings)
        self._stop = threading.Event()
        self._seen_generation = self._bus_generation()
        self.started_at = time.time()
        for target, name in ((self._start_models, "model-loader"), (self._heartbeat, "heartbeat"), (self._watch, "reload-watcher")):
            threading.Thread(target=target, name=name, daemon=True).start()
        logger.info("[HYBRID] worker %s starting: models %s, selector %s, layers %s, reload bus %s", self.worker,
                    self.settings.models, self.settings.alias, [s.source_id for s in self.resolver.sources], self.bus.kind)

    # -- background work ------------------------------------------------------------------------
    def _start_models(self) -> None:
        start = time.perf_counter()
        self.manager.load_until_ready(self._stop)
        if self.manager.ready():
            logger.info("[HYBRID] worker %s ready in %.2fs", self.worker, time.perf_counter() - start)
        # Revalidate models served from stale memory until the registry answers again.
        while not self._stop.wait(self.settings.retry_interval):
            self.manager.refresh_stale()

    def _bus_generation(self) -> int:
        try:
            return self.bus.generation()
        except CoordinationError as exc:
            logger.warning("[HYBRID] reload bus unavailable at start-up: %s", exc)
            return 0

    def _heartbeat(self) -> None:
        failing = False
        while not self._stop.wait(1.0 if not failing else 2.0):
            try:
                self.bus.heartbeat(self.worker)
                if failing:
                    logger.info("[HYBRID] reload bus reachable again")
                failing = False
            except CoordinationError as exc:
                if not failing:
                    logger.warning("[HYBRID] heartbeat failed: %s", exc)
                failing = True

    def _watch(self) -> None:
        """Apply reload orders announced by other workers or replicas, in order, and acknowledge them."""
        while not self._stop.wait(0.25):
            try:
                if self.bus.generation() <= self._seen_generation:
                    continue
                orders = self.bus.orders_after(self._seen_generation)
            except CoordinationError:
                continue  # the heartbeat thread logs the bus being down
            for order in orders:
                if order.issued_by != self.worker and order.model in self.manager.names:
                    result = self._apply(order.model, order.version)
                    try:
                        self.bus.ack(order.generation, self.worker, result)
                    except CoordinationError as exc:
                        logger.warning("[HYBRID] could not acknowledge reload %d: %s", order.generation, exc)
                self._seen_generation = max(self._seen_generation, order.generation)

    def _apply(self, model: str, version: str) -> dict[str, Any]:
        try:
            _, current = self.manager.activate(model, version)
            return {"ok": True, "version": current.record.version, "source": current.record.source}
        except (ReloadFailed, UnknownModel) as exc:
            return {"ok": False, "error": str(exc)}

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()
        self.manager.close()
        self.resolver.close()
        self.bus.close()

    # -- readiness --------------------------------------------------------------------------------
    def __is_ready__(self) -> bool:
        if self.manager.ready():
            return True
        raise HTTPException(status_code=503, detail=f"not ready: {self.manager.not_ready_reason()}")

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
            served = self.manager.get(model)  # the snapshot this request keeps until it answers
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
        served, errors = self.manager.served(), self.manager.errors()
        body = {
            "worker": self.worker,
            "ready": self.manager.ready(),
            "models": {
                name: served[name].describe() if name in served else {"name": name, "loaded": False, "error": errors.get(name)}
                for name in self.manager.names
            },
        }
        return JSONResponse(body)

    @admin_app.get("/registry/health")
    def registry_health(self) -> JSONResponse:
        start = time.perf_counter()
        layers = [h.to_dict() for h in self.resolver.health(self.manager.names)]
        try:
            live = self.bus.live_workers()
            bus = {"kind": self.bus.kind, "reachable": True, "generation": self.bus.generation(), "live_workers": live}
        except CoordinationError as exc:
            bus = {"kind": self.bus.kind, "reachable": False, "error": str(exc)}
        body = {
            "status": "ok" if self.manager.ready() else "not_ready",
            "worker": self.worker,
            "serving": {name: {**s.identity(), "registry": s.resolution.freshness(time.time()), "pending_version": s.pending_version}
                        for name, s in self.manager.served().items()},
            "last_known": self.resolver.last_known(),
            "layers": layers,
            "reload_bus": bus,
            "signed": self.settings.signing_key is not None,
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 3),
        }
        return JSONResponse(body)

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
        names = [body.model] if body.model else self.manager.names
        unknown = [n for n in names if n not in self.manager.names]
        if unknown:
            return error(404, str(UnknownModel(unknown[0], self.manager.names)))
        client = request.client.host if request.client else "?"
        logger.info("[HYBRID] reload requested by %s (%s): models %s, selector %s", client,
                    request.headers.get("user-agent", "-"), names, selector)
        results = []
        for name in names:
            try:
                results.append(self._reload_one(name, selector))
            except ModelNotResolvable as exc:
                return error(404, str(exc), model=name, trail=[a.to_dict() for a in exc.trail], done=results)
            except ReloadFailed as exc:
                status = 404 if isinstance(exc.__cause__, ModelNotResolvable) else 422
                trail = [a.to_dict() for a in exc.__cause__.trail] if isinstance(exc.__cause__, ModelNotResolvable) else []
                return error(status, str(exc), model=name, trail=trail, done=results)
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

    def _reload_one(self, name: str, selector: Selector) -> dict[str, Any]:
        start = time.perf_counter()
        with self.bus.lock(timeout=self.settings.reload_ack_timeout):
            previous, current = self.manager.activate(name, selector)
            order = self.bus.announce(name, current.record.version, str(selector), self.worker)
            self.bus.ack(order.generation, self.worker, {"ok": True, "version": current.record.version, "source": current.record.source})
            acks, missing = self.bus.wait_for_acks(order.generation, self.settings.reload_ack_timeout)
        return {
            "model": name,
            "previous": previous.record.to_dict() if previous else None,
            "current": current.record.to_dict(),
            "trail": current.resolution.trail_dicts(),
            "generation": order.generation,
            "workers": {
                "acknowledged": sum(1 for a in acks.values() if a.get("ok")),
                "failed": {w: a.get("error") for w, a in acks.items() if not a.get("ok")},
                "missing": missing,
                "acks": acks,
            },
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 1),
        }


SecurityClassifier.add_asgi_middleware(JSONOnly)
