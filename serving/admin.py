"""The admin surface any BentoML service holding a `ModelHost` gets: reload, models, health, webhook.

    @registry_admin                 # above @bentoml.service: applied below it, it raises TypeError
    @bentoml.service
    class Phishing:
        host = ModelHost(models=["phishing"], runner="mlflow-pyfunc")

`registry_admin` mounts `admin_app()` (POST /reload, GET /models, GET /registry/health,
POST /registry/webhook), starts every host of the service when a worker starts, makes `/readyz`
wait until every host's models are loaded (chained with the class's own `__is_ready__`, when it
has one: ready only when both are), stops the hosts on shutdown, and installs
`install_admin_middleware`: every error of the service answered as JSON `{"error": ...}` (404
and 405 included), 415 to a non-JSON body on the JSON routes, 400 naming the field to a body that
does not match the route (an unknown field included) and 413 to a body over
`REGISTRY_MAX_BODY_BYTES` on every route.

The same, written out by hand (examples/explicit_admin/service.py serves it):

    @bentoml.asgi_app(admin_app(), path="/")
    @bentoml.service
    class Phishing:
        host = ModelHost(models=["phishing"])

        def __init__(self) -> None:
            start_hosts(self)                   # load at worker start, not at the first request

        def __is_ready__(self) -> bool:
            return hosts_ready(self)            # 503 naming what is still loading

        @bentoml.on_shutdown
        def stop(self) -> None:
            stop_hosts(self)

    install_admin_middleware(Phishing, json_routes=("/classify",))

The routes find their hosts through the BentoML service instance of the worker they run in
(`bentoml.get_current_service()`): the `ModelHost` attributes its class declares.

Nothing secret leaves through them: every answer goes through `registry.redaction.redact`, and
`/models` and `/registry/health` give the operator's detail (trails, records, every layer's
answer) only to a request bearing the admin token (`REGISTRY_HEALTH_DETAIL=token`, the default);
anyone else gets the summary (`models_summary`, `health_summary`).
"""

from __future__ import annotations

import functools
import hmac
import logging
from typing import Any, Callable, Iterable, Mapping, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from registry.coordination import CoordinationError
from registry.errors import GateRefused, ModelNotResolvable, RegistryError, ReloadFailed, SettingsError, UnknownModel
from registry.metrics import bound_request_endpoints
from registry.redaction import redact, redact_text
from registry.record import Selector
from serving.host import ModelHost, declared_hosts, hosts_of

logger = logging.getLogger(__name__)


#: The routes `admin_app` serves.
ADMIN_ROUTES = ("/reload", "/models", "/registry/health", "/registry/webhook")


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    """A JSON error answer `{"error": message, ...}`, redacted."""
    return JSONResponse(redact({"error": message, **extra}), status_code=status)


def error_response(exc: BaseException, **extra: Any) -> JSONResponse:
    """The answer for an error, the one place an error becomes a status: the error's `status`
    (`registry.errors`; 500 for anything that is not a project error) and `{"error": message}`,
    with the trail of a resolution that failed and the figures of a gate refusal."""
    if not isinstance(exc, RegistryError):
        logger.error("[HYBRID] unexpected error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); the service log has the detail", **extra)
    body: dict[str, Any] = {}
    unresolved = exc if isinstance(exc, ModelNotResolvable) else exc.__cause__
    if isinstance(exc, (ModelNotResolvable, ReloadFailed)):
        body["trail"] = [a.to_dict() for a in unresolved.trail] if isinstance(unresolved, ModelNotResolvable) else []
    if isinstance(exc, GateRefused):
        body["gate"] = exc.figures
    message = f"reload coordination failed: {exc}" if isinstance(exc, CoordinationError) else str(exc)
    return error(exc.status, message, **{**body, **extra})


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


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    response = error(exc.status_code, _status_message(exc.status_code, request.method, request.url.path,
                                                      (headers or {}).get("Allow"), str(exc.detail)))
    if headers:
        response.headers.update(headers)
    return response


async def _registry_error(_: Request, exc: RegistryError) -> JSONResponse:
    return error_response(exc)


def _status_message(status: int, method: str, path: str, allow: Optional[str], detail: str) -> str:
    """What a 404 or 405 of the routing says (the route and the methods it takes); any other status keeps its detail."""
    if status == 404 and detail in ("", "Not Found"):
        return f"no route {_clean(path)[:200]} on this service"
    if status == 405 and detail in ("", "Method Not Allowed"):
        return f"method {_clean(method)[:20]} not allowed on {_clean(path)[:200]}" + (f"; use {allow}" if allow else "")
    return detail


#: The one message for a body that is not JSON at all, on every JSON route.
INVALID_JSON = "invalid request body: not valid JSON"


def _problems(errors: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A 400 body naming the field and the problem, in ASCII, without echoing the input (which
    fails for lone surrogates, NaN or raw bytes: FastAPI's own handler answers 500 then).

    Every JSON route says the same: the field's path without FastAPI's leading `body`, and one
    message for a body that does not parse."""
    errors = list(errors)
    if any(e.get("type") == "json_invalid" for e in errors):
        return {"error": INVALID_JSON, "detail": [{"loc": [], "msg": "not valid JSON", "type": "json_invalid"}]}
    problems = []
    for e in errors:
        loc = [_clean(part) for part in e.get("loc", ())]
        problems.append({"loc": loc[1:] if loc[:1] == ["body"] else loc, "msg": _clean(e.get("msg", "")), "type": _clean(e.get("type", ""))})
    first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
    return {"error": f"invalid request body at {'.'.join(first['loc']) or 'body'}: {first['msg']}", "detail": problems}


async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    body = _problems(exc.errors())
    logger.info("[HYBRID] invalid admin request body: %s", body["error"])
    return JSONResponse(body, status_code=400)


def _hosts() -> list[ModelHost]:
    """The hosts of the BentoML service instance this request runs in (one per worker)."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        instance = bentoml.get_current_service()
    except BentoMLException:
        raise HTTPException(status_code=503, detail="the service instance of this worker is not created yet") from None
    hosts = hosts_of(instance)
    if not hosts:
        raise HTTPException(status_code=503, detail=f"{type(instance).__name__} declares no ModelHost attribute")
    return hosts


def _host_for(model: Optional[str] = None) -> ModelHost:
    """The host serving `model` (the first host when no model is named); UnknownModel when none does."""
    hosts = _hosts()
    if model is None:
        return hosts[0]
    for host in hosts:
        if model in host.names:
            return host
    raise UnknownModel(model, [n for h in hosts for n in h.names])


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
    # starlette types a handler as taking any Exception; each of these takes the one it is registered for
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_body)  # type: ignore[arg-type]
    app.add_exception_handler(RegistryError, _registry_error)  # type: ignore[arg-type]
    # /metrics labels requests by path: only the routes this service has, any other path is `other`.
    bound_request_endpoints(ADMIN_ROUTES)

    def view(request: Request, path: str, collect: Callable[[ModelHost], dict[str, Any]],
             summarize: Callable[[dict[str, Any]], dict[str, Any]]) -> JSONResponse:
        """The operator's detail with the admin token (or REGISTRY_HEALTH_DETAIL=open), else the summary."""
        detail = _detail(request, path)
        if isinstance(detail, JSONResponse):
            return detail
        full = _merged(collect(h) for h in _hosts())
        return answer({**full, "view": "full"} if detail else summarize(full))

    @app.get("/models")
    def models(request: Request) -> JSONResponse:
        return view(request, "/models", ModelHost.models, models_summary)

    @app.get("/registry/health")
    def registry_health(request: Request) -> JSONResponse:
        return view(request, "/registry/health", ModelHost.health, health_summary)

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
        body = body or ReloadRequest(model=None, alias=None)
        hosts = _hosts()
        denied = _authorize(hosts[0], request)
        if denied is not None:
            return denied
        try:
            plan = [(host, [body.model] if body.model else host.names,
                     Selector.from_request(body.alias, body.version, default=host.settings.alias))
                    for host in ([_host_for(body.model)] if body.model else hosts)]
        except RegistryError as exc:  # a bad selector (400), an unknown model (404)
            logger.info("[HYBRID] reload refused: %s", exc)
            return error_response(exc)
        client = request.client.host if request.client else "?"
        logger.info("[HYBRID] reload requested by %s (%s): models %s, selector %s", client,
                    request.headers.get("user-agent", "-"), [n for _, names, _ in plan for n in names], plan[0][2])
        results = []
        for host, names, selector in plan:
            for name in names:
                try:
                    results.append(host.rollout(name, selector, trigger="reload"))
                except RegistryError as exc:  # UnknownModel, ReloadFailed (GateRefused), CoordinationError
                    return error_response(exc, model=name, done=results)
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
        chunks: list[bytes] = []
        size = 0
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
            schema = self.schemas.get(str(path))
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


def _strict(schema: type[BaseModel]) -> type[BaseModel]:
    """The API's input model refusing unknown fields, as `ReloadRequest` does (BentoML's ignores them)."""
    return type(schema.__name__, (schema,), {"model_config": {**schema.model_config, "extra": "forbid"},
                                             "__module__": schema.__module__})


class JSONErrors:
    """Every error of the service as JSON `{"error": ...}`: the plain-text answers of BentoML's own
    routing (405 for GET /classify, 404, a bare 500) are rewritten; a JSON answer passes unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_json_errors(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
                if message["status"] >= 400 and "json" not in content_type:
                    held.update(start=message, body=b"", allow=headers.get(b"allow", b"").decode("latin-1") or None)
                    return
            elif "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start = held.pop("start")
                status = start["status"]
                detail = held["body"].decode("utf-8", "replace").strip()
                text = _status_message(status, scope.get("method", ""), scope.get("path", ""), held.get("allow"), detail)
                response = error(status, text or f"HTTP {status}")
                keep = [(k, v) for k, v in start.get("headers") or [] if k.lower() not in (b"content-type", b"content-length")]
                await send({"type": "http.response.start", "status": status,
                            "headers": keep + [(k, v) for k, v in response.raw_headers if k.lower() in (b"content-type", b"content-length")]})
                await send({"type": "http.response.body", "body": response.body})
                return
            await send(message)

        await self.app(scope, receive, send_json_errors)


def install_admin_middleware(service: Any, *, json_routes: tuple[str, ...] = ()) -> None:
    """The admin surface's middleware on a BentoML service (what `registry_admin` installs):
    JSON errors everywhere, the body limit, and the JSON routes' checks (415 to a non-JSON body,
    400 naming the field, an unknown field included, to a body that does not match the API).

    `json_routes`: the service's own JSON API routes to check as `/reload` is checked.
    """
    from _bentoml_sdk import Service

    if not isinstance(service, Service):
        raise TypeError(f"install_admin_middleware needs the object @bentoml.service returns, not {service!r}")
    hosts = declared_hosts(service.inner)
    try:
        max_body_bytes = min(getattr(service.inner, name).settings_now().max_body_bytes for name in hosts) if hosts else None
    except SettingsError as exc:
        raise SystemExit(f"[HYBRID] cannot start {service.inner.__name__}: {exc}") from None
    # First (outer): every error is JSON; no route reads a body over the limit; then a JSON API's
    # body is checked against the model BentoML builds from the API's signature.
    service.add_asgi_middleware(JSONErrors)
    if max_body_bytes is not None:
        service.add_asgi_middleware(BodyLimit, max_bytes=max_body_bytes)
    schemas = {api.route: _strict(api.input_spec) for api in getattr(service, "apis", {}).values() if api.route in json_routes}
    service.add_asgi_middleware(JSONOnly, routes=("/reload", *json_routes), schemas=schemas)


def start_hosts(instance: Any) -> None:
    """Start every host the service instance declares (at worker start, not at the first request)."""
    hosts_of(instance)


def hosts_ready(instance: Any) -> bool:
    """True when every host of the instance has its models loaded (in every worker of this replica);
    raises a 503 naming what is still loading, which BentoML's `/readyz` answers."""
    waiting = [reason for ready, reason in (host.replica_ready() for host in hosts_of(instance)) if not ready]
    if waiting:
        raise HTTPException(status_code=503, detail=redact_text("not ready: " + "; ".join(waiting)))
    return True


def stop_hosts(instance: Any) -> None:
    """Stop the hosts the instance started (a host never started is left alone)."""
    for host in hosts_of(instance, start=False):
        host.stop()


def registry_admin(service: Any = None, *, json_routes: tuple[str, ...] = ()) -> Any:
    """Give a BentoML service the registry's admin routes and its hosts' lifecycle.

    Apply it above `@bentoml.service` (or call it on a service object); applied to a plain class
    (below `@bentoml.service`) it raises TypeError. A class with its own `__is_ready__` keeps it:
    `/readyz` answers ready only when the hosts are loaded and the class's own check says ready.
    `json_routes`: the service's own JSON API routes that should answer 415 to a non-JSON body, as
    `/reload` does, and 400 naming the field to a body that does not match the API's signature.
    """
    if service is None:
        return functools.partial(registry_admin, json_routes=json_routes)
    import inspect

    import bentoml
    from _bentoml_sdk import Service

    if not isinstance(service, Service):
        what = getattr(service, "__name__", repr(service))
        raise TypeError(f"registry_admin must be applied above @bentoml.service, to the service object it returns; "
                        f"{what} is a plain class (move @registry_admin to the line above @bentoml.service)")
    cls = service.inner
    hosts = declared_hosts(cls)
    if not hosts:
        raise TypeError(f"{cls.__name__} declares no ModelHost attribute (e.g. `host = ModelHost(models=[...])`)")
    for name in hosts:
        # Checked when the service module is imported, so a bad setting stops `bentoml serve` at once,
        # with one line naming the variable, instead of every worker failing in BentoML's restart loop.
        try:
            getattr(cls, name).check_configuration()
        except SettingsError as exc:
            raise SystemExit(f"[HYBRID] cannot start {cls.__name__}: {exc}") from None
    original_init = cls.__init__
    own_ready = vars(cls).get("__is_ready__")

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        start_hosts(self)  # start the hosts now, not at the first request

    if own_ready is None:
        def __is_ready__(self: Any) -> bool:
            return hosts_ready(self)
    elif inspect.iscoroutinefunction(own_ready):
        async def __is_ready__(self: Any) -> bool:  # type: ignore[misc]  # one of three definitions
            return hosts_ready(self) and bool(await own_ready(self))
    else:
        def __is_ready__(self: Any) -> bool:
            return hosts_ready(self) and bool(own_ready(self))

    @bentoml.on_shutdown
    def _stop_registry_hosts(self: Any) -> None:
        stop_hosts(self)

    cls.__init__ = __init__
    cls.__is_ready__ = __is_ready__
    cls._stop_registry_hosts = _stop_registry_hosts
    bentoml.asgi_app(admin_app(), path="/")(service)
    install_admin_middleware(service, json_routes=json_routes)
    return service
