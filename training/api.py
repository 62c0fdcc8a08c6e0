"""The reference training API: `GET /models/latest` answers the registry payload, `GET /health`.

It serves the registry the way the seed's training service does, in the resolver's order
(cache -> MLflow -> file), and refreshes the cache and the file when it had to ask MLflow. Run it with
`python -m training.api --port 8002` (settings from the same `REGISTRY_*` variables).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from registry.errors import PayloadError, SourceUnavailable
from registry.payload import RegistryPayload
from registry.settings import RegistrySettings
from registry.signing import PayloadCodec
from registry.resolver import Resolver
from registry.sources.mlflow_registry import MLflowRegistrySource
from registry.sources.payload_source import write_all
from registry.sources.training_api import TrainingAPISource

logger = logging.getLogger(__name__)


class TrainingRegistry:
    """The training service's view of the registry: the service's chain without itself and the fallback.

    The order is the resolver's (cache, MLflow, file); a payload read from MLflow is written to
    the cache and the file.
    """

    def __init__(self, settings: RegistrySettings):
        resolver = Resolver.from_settings(settings)
        self.layers = [s for s in resolver.sources if not isinstance(s, TrainingAPISource) and not s.stand_in]
        self.cache, self.mlflow, self.backup = resolver.cache, resolver.authority, resolver.backup
        self.codec = PayloadCodec.from_secret(settings.signing_key)

    def payload(self) -> tuple[Optional[RegistryPayload], str, list[str]]:
        """The payload, the layer that gave it, and why the layers above it did not."""
        problems: list[str] = []
        for layer in self.layers:
            try:
                if isinstance(layer, MLflowRegistrySource):
                    payload: Optional[RegistryPayload] = layer.payload()
                    write_all((self.cache, self.backup), lambda target, fresh=payload: target.store_payload(fresh), "refresh failed")
                else:
                    payload = layer.load_payload()
            except (SourceUnavailable, PayloadError) as exc:
                layer.logger.warning("%s %s", layer.tag, exc)
                problems.append(f"{layer.source_id}: {exc}")
                continue
            if payload is not None:
                if layer.registry_copy:
                    logger.info("[FALLBACK] serving the registry from %s", layer.source_id)
                return payload, layer.source_id, problems
            problems.append(f"{layer.source_id}: empty")
        return None, "", problems


def create_app(settings: Optional[RegistrySettings] = None) -> Starlette:
    settings = settings or RegistrySettings.from_env()
    registry = TrainingRegistry(settings)
    if registry.mlflow is not None:
        _ = registry.mlflow.client  # import mlflow now (seconds), not inside the first request's timeout

    async def models_latest(request: Request) -> Response:
        # Blocking clients run in Starlette's thread pool, never on the event loop.
        payload, source, problems = await run_in_threadpool(registry.payload)
        if payload is None:
            return JSONResponse({"error": "no registry data available", "layers": problems}, status_code=503)
        return Response(registry.codec.encode(payload), media_type="application/json", headers={"X-Registry-Source": source})

    async def health(request: Request) -> Response:
        start = time.perf_counter()
        models = settings.models or None
        checks = registry.layers
        layers = [await run_in_threadpool(s.health, models or []) for s in checks]
        ok = any(layer.reachable for layer in layers)
        body = {"status": "ok" if ok else "degraded", "layers": [layer.to_dict() for layer in layers],
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 3)}
        return JSONResponse(body, status_code=200 if ok else 503)

    return Starlette(routes=[Route("/models/latest", models_latest), Route("/health", health)])


def main(argv: Optional[list[str]] = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Reference training API serving the model registry payload.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
