"""Signed registry payloads: HMAC-SHA256 over a canonical JSON form, carried in the payload itself.

The registry decides which code the service loads (a PyTorch pickle is code), and the payload
travels through Redis, an HTTP API and a file. With `REGISTRY_SIGNING_KEY` set, every writer adds
`"signature": "hmac-sha256:<hex>"` at the top level and every reader refuses a payload whose
signature is missing or wrong. The signature covers the canonical JSON of everything else in the
object (keys sorted, no spaces, UTF-8), so readers that do not know about signing still read it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Mapping, Optional

from registry.errors import PayloadError
from registry.payload import RegistryPayload

SIGNATURE_KEY = "signature"
SCHEME = "hmac-sha256:"


class SignatureError(PayloadError):
    """A payload's signature is missing or does not match the key."""


def canonical(data: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != SIGNATURE_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class PayloadCodec:
    """Turns payloads into stored text and back, signing and verifying when a key is set."""

    def __init__(self, key: Optional[str] = None):
        self._key = key.encode("utf-8") if key else None

    @classmethod
    def from_secret(cls, secret: Any) -> "PayloadCodec":
        """From a settings value: a pydantic SecretStr, a plain string, or None (unsigned)."""
        if secret is None:
            return cls(None)
        return cls(secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret))

    @property
    def signed(self) -> bool:
        return self._key is not None

    def _mac(self, data: Mapping[str, Any]) -> str:
        assert self._key is not None
        return SCHEME + hmac.new(self._key, canonical(data), hashlib.sha256).hexdigest()

    def encode(self, payload: RegistryPayload) -> str:
        data = {k: v for k, v in payload.raw.items() if k != SIGNATURE_KEY}
        if self._key is not None:
            data[SIGNATURE_KEY] = self._mac(data)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def decode(self, raw: object, where: str) -> RegistryPayload:
        payload = RegistryPayload.parse(raw, where)
        if self._key is None:
            return payload
        given = payload.raw.get(SIGNATURE_KEY)
        if not isinstance(given, str):
            raise SignatureError(where, "unsigned payload refused (REGISTRY_SIGNING_KEY is set)")
        if not hmac.compare_digest(given, self._mac(payload.raw)):
            raise SignatureError(where, "signature does not match (payload altered or signed with another key)")
        return payload
