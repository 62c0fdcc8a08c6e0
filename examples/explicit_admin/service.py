"""The admin surface wired by hand: what `@registry_admin` does, written out (no decorator).

    cd examples/explicit_admin && bentoml serve service:Phishing

The same routes (POST /reload, GET /models, GET /registry/health, POST /registry/webhook) and the
same lifecycle (the host starts with the worker, /readyz waits for its model, shutdown stops it),
for a service that wants its own `__init__`, `__is_ready__` or shutdown beside the host's.
`install_admin_middleware` adds what the decorator adds around the routes: every error as JSON,
the body limit, and the JSON checks of `/reload` and of the routes named.
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
from pydantic import Field

from registry.errors import RegistryError
from serving.admin import admin_app, error_response, hosts_ready, install_admin_middleware, start_hosts, stop_hosts
from serving.host import ModelHost


@bentoml.asgi_app(admin_app(), path="/")
@bentoml.service(name="phishing_explicit", traffic={"timeout": 60})
class Phishing:
    """The quickstart's service, with the admin routes and the host's lifecycle spelled out."""

    host = ModelHost(models=["phishing"])

    def __init__(self) -> None:
        self.requests = 0
        start_hosts(self)  # load when the worker starts, not at the first request

    def __is_ready__(self) -> bool:
        return hosts_ready(self)  # 503 naming what is still loading; add the service's own checks here

    @bentoml.on_shutdown
    def stop(self) -> None:
        stop_hosts(self)

    @bentoml.api(route="/classify")
    async def classify(self, texts: Annotated[list[str], Field(min_length=1, max_length=64)]) -> dict[str, Any]:
        self.requests += 1
        try:
            served = self.host.get("phishing")
        except RegistryError as exc:
            return error_response(exc)
        return {"model": served.identity(), "predictions": await served.predict(texts), "requests": self.requests}


install_admin_middleware(Phishing, json_routes=("/classify",))
