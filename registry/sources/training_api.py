"""Training API layer: `GET {base}/models/latest` answers the registry payload."""

from __future__ import annotations

from typing import Optional

import httpx

from registry.errors import SourceUnavailable
from registry.payload import RegistryPayload
from registry.redaction import redact_text
from registry.settings import RegistrySettings
from registry.signing import PayloadCodec
from registry.sources.payload_source import PayloadSource


class TrainingAPISource(PayloadSource):
    """The training service: a pooled httpx client, a bounded timeout, httpx's connect retries."""

    source_id = "training_api"
    tag = "[HYBRID]"
    live_registry = True
    write_back = True

    def __init__(self, base_url: str, *, timeout: float, codec: Optional[PayloadCodec] = None):
        super().__init__(codec)
        self.base_url = base_url.rstrip("/")
        self.client = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout),
            transport=httpx.HTTPTransport(retries=1),
            headers={"Accept": "application/json"},
        )

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> Optional["TrainingAPISource"]:
        if not settings.training_api_url:
            return None
        return cls(settings.training_api_url, timeout=settings.training_api_timeout,
                   codec=PayloadCodec.from_secret(settings.signing_key))

    def load_payload(self) -> Optional[RegistryPayload]:
        try:
            response = self.client.get("/models/latest")
        except httpx.HTTPError as exc:
            raise SourceUnavailable(self.source_id, f"{type(exc).__name__}: {exc or 'no detail'}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise SourceUnavailable(self.source_id, f"HTTP {response.status_code} from {redact_text(str(response.request.url))}")
        return self.decode(response.content, where=f"training API {redact_text(str(response.request.url))}")

    def health_detail(self, payload: Optional[RegistryPayload]) -> str:
        return redact_text(self.base_url)

    def close(self) -> None:
        self.client.close()
