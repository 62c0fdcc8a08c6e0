"""The admin surface any BentoML service holding a `ModelHost` gets: reload, models, health, webhook.

    @registry_admin                 # above @bentoml.service
    @bentoml.service
    class Phishing:
        host = ModelHost(models=["phishing"], runner="mlflow-pyfunc")

`registry_admin` mounts `admin_app()` (POST /reload, GET /models, GET /registry/health,
POST /registry/webhook), starts every host of the service when a worker starts, makes `/readyz`
wait until every host's models are loaded, stops the hosts on shutdown, answers 415 to a
non-JSON body on the JSON routes and 413 to a body over `REGISTRY_MAX_BODY_BYTES` on every route.
The routes find the host of the worker they run in.

Nothing secret leaves through them: every answer goes through `registry.redaction.redact`, and
`/models` and `/registry/health` give the operator's detail (trails, records, every layer's
answer) only to a request bearing the admin token (`REGISTRY_HEALTH_DETAIL=token`, the default);
anyone else gets the summary (`models_summary`, `health_summary`).
"""

from __future__ import annotations

import functools
import hmac
import logging
from typing import Any, Iterable, Mapping, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from registry.coordination import CoordinationError
from registry.errors import GateRefused, ModelNotResolvable, ReloadFailed, SelectorError, SettingsError, UnknownModel
from registry.metrics import bound_request_endpoints
from registry.redaction import redact, redact_text
from registry.record import Selector
from runners.host import ModelHost, live_hosts

logger = logging.getLogger(__name__)


#: The routes `admin_app` serves.
ADMIN_ROUTES = ("/reload", "/models", "/registry/health", "/registry/webhook")


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(redact({"error": message, **extra}), status_code=status)


def answer(body: Any, status: int = 200) -> JSONResponse:
    """A JSON answer with every credential in it redacted."""
    return JSONResponse(redact(body), status_code=status)


SUMMARY_HINT = "summary; the detail needs Authorization: Bearer <REGISTRY_ADMIN_TOKEN> (REGISTRY_HEALTH_DETAIL=token)"


def models_summary(full: dict[str, Any]) -> dict[str, Any]:
    """What `GET /models` tells a request without the admin token: ready, degraded, and per model
    the name, version and source layer that serves it (`loaded: false` when none does)."""
    models = {}
    for name, body in (full.get("models") or {}).items():
        loaded = body.get("loaded", True) and body.get("version") is not None
        models[name] = {"name": name, "version": body.get("version") if loaded else None,
                        "source": body.get("source") if loaded else None, "loaded": bool(loaded)}
    return {"ready": full.get("ready"), "degraded": full.get("degraded"), "models": models, "view": SUMMARY_HINT}


def health_summary(full: dict[str, Any]) -> dict[str, Any]:
    """What `GET /registry/health` tells a request without the admin token: status, degraded, per model
    the name, version and source serving, per layer (and the reload bus) whether it is reachable."""
    serving = {name: {"name": name, "version": s.get("version"), "source": s.get("source")}
               for name, s in (full.get("serving") or {}).items()}
    layers = [{"source": layer.get("source"), "reachable": bool(layer.get("reachable"))} for layer in full.get("layers") or ()]
    bus = full.get("reload_bus") or {}
    return {"status": full.get("status"), "degraded": full.get("degraded"), "serving": serving, "layers": layers,
            "reload_bus": {"reachable": bool(bus.get("reachable"))}, "view": SUMMARY_HINT}


class ReloadRequest(BaseModel):
    """Body of POST /reload: which model (default: every configured model) and which version."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = Field(None, max_length=200)
    alias: Optional[StrictStr] = Field(None, max_length=300)
    version: Optional[StrictInt | StrictStr] = None  # strict: `true` or `1.0` is not version 1


def _clean(value: object) -> str:
    return str(value).encode("ascii", "backslashreplace").decode("ascii")


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


def _problems(errors: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A 400 body naming the field and the problem, in ASCII, without echoing the input (which
    fails for lone surrogates, NaN or raw bytes: FastAPI's own handler answers 500 then)."""
    problems = [{"loc": [_clean(part) for part in e.get("loc", ())], "msg": _clean(e.get("msg", "")), "type": _clean(e.get("type", ""))}
                for e in errors]
    first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
    return {"error": f"invalid request body at {'.'.join(first['loc']) or 'body'}: {first['msg']}", "detail": problems}


async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    body = _problems(exc.errors())
    logger.info("[HYBRID] invalid admin request body: %s", body["error"])
    return JSONResponse(body, status_code=400)


def _host_for(model: Optional[str] = None) -> ModelHost:
    hosts = live_hosts()
    if not hosts:
        raise HTTPException(status_code=503, detail="no model host is running in this worker")
    return next((h for h in hosts if model in h.names), hosts[0])


def _merged(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    merged = dict(parts[0])
    merged["models"] = {k: v for p in parts for k, v in p.get("models", {}).items()}
    merged["ready"] = all(p.get("ready") for p in parts)
    merged["degraded"] = any(p.get("degraded") for p in parts)
    return merged


def _authorize(host: ModelHost, request: Request, what: str = "reload") -> Optional[JSONResponse]:
    token = host.settings.admin_token
    if token is None:
        return error(403, f"{what} is disabled: REGISTRY_ADMIN_TOKEN is not set on the service")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # constant-time comparison of bytes; a missing header compares against nothing
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        client = request.client.host if request.client else "?"
        logger.warning("[HYBRID] %s refused for %s: %s", what, client, "missing token" if not header else "wrong token")
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return None


def _detail(request: Request, route: str) -> Optional[JSONResponse] | bool:
    """Whether this request gets the operator's detail of `route` (True), the summary (False), or a 401
    (a wrong token: a caller that sends one expects the detail, so it is told, not silently given less)."""
    host = _host_for()
    if host.settings.health_detail == "open":
        return True
    if not request.headers.get("authorization"):
        return False
    denied = _authorize(host, request, f"{route} detail")
    if denied is None:
        return True
    if denied.status_code == 403:  # no token configured: nobody gets the detail, the summary is all there is
        return False
    return denied


def admin_app() -> FastAPI:
    """A FastAPI app with the registry's admin routes; mount it with `bentoml.asgi_app(admin_app(), path="/")`."""
    app = FastAPI(title="registry admin", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)

    @app.get("/models")
    def models(request: Request) -> JSONResponse:
        detail = _detail(request, "/models")
        if isinstance(detail, JSONResponse):
            return detail
        full = _merged(h.models() for h in live_hosts() or [_host_for()])
        return answer({**full, "view": "full"} if detail else models_summary(full))

    @app.get("/registry/health")
    def registry_health(request: Request) -> JSONResponse:
        detail = _detail(request, "/registry/health")
        if isinstance(detail, JSONResponse):
            return detail
        full = _merged(h.health() for h in live_hosts() or [_host_for()])
        return answer({**full, "view": "full"} if detail else health_summary(full))

    @app.post("/registry/webhook")
    async def registry_webhook(request: Request) -> JSONResponse:
        """MLflow's registry webhook: verified with REGISTRY_WEBHOOK_SECRET, acted on in the background."""
        body = await request.body()
        status, result = _host_for().follower.webhook(request.headers, body)
        return answer(result, status)

    @app.post("/reload", responses={
        400: {"description": "malformed body or selector"}, 401: {"description": "missing or wrong bearer token"},
        403: {"description": "reload disabled: REGISTRY_ADMIN_TOKEN not set"}, 404: {"description": "unknown model, or no such version or alias"},
        415: {"description": "body is not JSON"}, 422: {"description": "the version could not be loaded, or the gate refused it"},
        503: {"description": "reload coordination (the bus) failed"}})
    def reload(request: Request, body: Optional[ReloadRequest] = None) -> JSONResponse:
        body = body or ReloadRequest()
        host = _host_for(body.model)
        denied = _authorize(host, request)
        if denied is not None:
            return denied
        try:
            selector = Selector.from_request(body.alias, body.version, default=host.settings.alias)
        except SelectorError as exc:
            logger.info("[HYBRID] reload refused: %s", exc)
            return error(400, str(exc))
        names = [body.model] if body.model else host.names
        unknown = [n for n in names if n not in host.names]
        if unknown:
            return error(404, str(UnknownModel(unknown[0], host.names)))
        client = request.client.host if request.client else "?"
        logger.info("[HYBRID] reload requested by %s (%s): models %s, selector %s", client,
                    request.headers.get("user-agent", "-"), names, selector)
        results = []
        for name in names:
            try:
                results.append(host.rollout(name, selector, trigger="reload"))
            except ModelNotResolvable as exc:
                return error(404, str(exc), model=name, trail=[a.to_dict() for a in exc.trail], done=results)
            except ReloadFailed as exc:
                cause = exc.__cause__
                status = 404 if isinstance(cause, ModelNotResolvable) else 422
                trail = [a.to_dict() for a in cause.trail] if isinstance(cause, ModelNotResolvable) else []
                extra = {"gate": exc.figures} if isinstance(exc, GateRefused) else {}
                return error(status, str(exc), model=name, trail=trail, done=results, **extra)
            except CoordinationError as exc:
                return error(503, f"reload coordination failed: {exc}", model=name, done=results)
        return answer(results[0] if body.model or len(results) == 1 else {"reloads": results})

    return app


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413 before the app reads any of it.

    A Content-Length over the limit is refused at once, unread. A chunked body (no Content-Length)
    is counted as its chunks arrive, at most `max_bytes` of it held, and refused the moment it
    passes the limit; one within it is handed to the app whole. Either way the app never sees an
    oversized body (BentoML would log a traceback for a body that fails while it reads it).
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await self._refuse(scope, receive, send, 400, f"Content-Length {length[:40]!r} is not a number")
            elif int(length) > self.max_bytes:
                await self._refuse(scope, receive, send, 413, f"body of {int(length)} bytes")
            else:  # the server delivers no more than Content-Length says
                await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)  # no body
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                chunks.clear()
                await self._refuse(scope, receive, send, 413, f"chunked body passing {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        await self.app(scope, _replay(b"".join(chunks)), send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, status: int, what: str) -> None:
        client = (scope.get("client") or ("?",))[0]
        if status == 413:
            message = f"request body too large: {what}; at most {self.max_bytes} bytes (REGISTRY_MAX_BODY_BYTES)"
        else:
            message = f"bad request: {what}"
        logger.info("[HYBRID] %s %s from %s refused (%d): %s", scope.get("method"), scope.get("path"), client, status, message)
        # Connection: close, so the server does not read the rest of the body to reuse the connection.
        response = JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)


class JSONOnly:
    """Answer 415 to a non-JSON body on the JSON APIs (BentoML turns a bad multipart body into a 500),
    and 400 naming the field to a body that does not match the route's schema (BentoML answers
    "1 validation error for Input" and logs a traceback for each such client error)."""

    def __init__(self, app: Any, routes: tuple[str, ...] = ("/reload",), schemas: Optional[dict[str, type[BaseModel]]] = None) -> None:
        self.app = app
        self.routes = routes
        self.schemas = dict(schemas or {})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in self.routes:
            path = scope.get("path")
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if content_type and content_type != "application/json" and not content_type.endswith("+json"):
                logger.info("[HYBRID] %s refused: content type %r", path, content_type)
                response = error(415, f"expected an application/json body, got {content_type!r}")
                await response(scope, receive, send)
                return
            schema = self.schemas.get(path)
            if schema is not None:
                body = await _read_body(receive)
                problem = _schema_problem(schema, body)
                if problem is not None:
                    logger.info("[HYBRID] %s refused: %s", path, problem["error"])
                    await JSONResponse(problem, status_code=400)(scope, receive, send)
                    return
                receive = _replay(body)
        await self.app(scope, receive, send)


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _schema_problem(schema: type[BaseModel], body: bytes) -> Optional[dict[str, Any]]:
    from pydantic import ValidationError

    try:
        schema.model_validate_json(body)
    except ValidationError as exc:
        return _problems(exc.errors(include_url=False, include_input=False))
    except (ValueError, RecursionError) as exc:
        return {"error": f"invalid request body: {_clean(exc)[:200]}"}
    return None


def registry_admin(service: Any = None, *, json_routes: tuple[str, ...] = ()) -> Any:
    """Give a BentoML service the registry's admin routes and its hosts' lifecycle.

    Apply it above `@bentoml.service` (or call it on a service object). `json_routes`: the
    service's own JSON API routes that should answer 415 to a non-JSON body, as `/reload` does,
    and 400 naming the field to a body that does not match the API's signature.
    """
    if service is None:
        return functools.partial(registry_admin, json_routes=json_routes)
    import bentoml

    cls = getattr(service, "inner", service)
    hosts = [name for name in dir(cls) if isinstance(getattr(cls, name, None), ModelHost)]
    if not hosts:
        raise TypeError(f"{cls.__name__} declares no ModelHost attribute (e.g. `host = ModelHost(models=[...])`)")
    for name in hosts:
        # Checked when the service module is imported, so a bad setting stops `bentoml serve` at once,
        # with one line naming the variable, instead of every worker failing in BentoML's restart loop.
        try:
            getattr(cls, name).check_configuration()
        except SettingsError as exc:
            raise SystemExit(f"[HYBRID] cannot start {cls.__name__}: {exc}") from None
    try:
        max_body_bytes = min(getattr(cls, name).settings_now().max_body_bytes for name in hosts)
    except SettingsError as exc:
        raise SystemExit(f"[HYBRID] cannot start {cls.__name__}: {exc}") from None
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        for name in hosts:
            getattr(self, name)  # start the host now, not at the first request

    def __is_ready__(self: Any) -> bool:
        waiting = [reason for ready, reason in (getattr(self, name).replica_ready() for name in hosts) if not ready]
        if waiting:
            raise HTTPException(status_code=503, detail=redact_text("not ready: " + "; ".join(waiting)))
        return True

    @bentoml.on_shutdown
    def _stop_registry_hosts(self: Any) -> None:
        for name in hosts:
            getattr(self, name).stop()

    cls.__init__ = __init__
    if "__is_ready__" not in vars(cls):
        cls.__is_ready__ = __is_ready__
    cls._stop_registry_hosts = _stop_registry_hosts
    bentoml.asgi_app(admin_app(), path="/")(service)
    # /metrics labels requests by path: only the routes this service has, any other path is `other`.
    bound_request_endpoints(ADMIN_ROUTES)
    if hasattr(service, "add_asgi_middleware"):
        # First (outer): no route reads a body over the limit; then a JSON API's body is checked
        # against the model BentoML builds from the API's signature.
        service.add_asgi_middleware(BodyLimit, max_bytes=max_body_bytes)
        schemas = {api.route: api.input_spec for api in getattr(service, "apis", {}).values() if api.route in json_routes}
        service.add_asgi_middleware(JSONOnly, routes=("/reload", *json_routes), schemas=schemas)
    return service
