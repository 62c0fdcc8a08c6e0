"""Verify and parse MLflow model-registry webhook deliveries (the scheme of mlflow/webhooks/delivery.py, MLflow 3).

MLflow POSTs the JSON `{"entity", "action", "timestamp" (ISO 8601), "data": {...}}` (plus "workspace"
when workspaces are on) with `X-MLflow-Delivery-Id` (a uuid4), `X-MLflow-Timestamp` (integer epoch
seconds) and, for a webhook with a secret, exactly one signature
`X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "{delivery id}.{timestamp}.{raw body}")>`.
The event name is `"{entity}.{action}"` from the body; there is no event header.

Checks, in order: signature header present (401), delivery id and timestamp headers well formed
(400), signature matches (401), timestamp within `tolerance` of `now` (400), and only then the body:
JSON with string `entity`/`action` (400), and for a known event (`KNOWN_EVENTS`) every field it needs
in `data` (400). An unknown event is not an error: it comes back with whatever `name`, `version` and
`alias` its `data` holds (`registered_name` "" when absent, `known` False) so the caller can answer
2xx and ignore it. `RegistryEvent.timestamp` is the signed header, not the body's ISO timestamp.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from registry.errors import WebhookRejected, safe_repr

SIGNATURE_HEADER = "X-MLflow-Signature"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_VERSION = "v1"

#: The `data` fields (non-empty strings) each event this service acts on must carry.
KNOWN_EVENTS: dict[str, tuple[str, ...]] = {
    "model_version.created": ("name", "version"),
    "model_version_alias.created": ("name", "alias", "version"),  # also when an alias moves
    "model_version_alias.deleted": ("name", "alias"),
}

# No dots in the id and only digits in the timestamp, so "{id}.{timestamp}.{body}" splits one way only.
_DELIVERY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class RegistryEvent:
    """One verified delivery: which event, on which registered model, version and alias."""

    delivery_id: str
    event: str
    registered_name: str
    version: Optional[str]
    alias: Optional[str]
    timestamp: float

    @property
    def known(self) -> bool:
        """Whether this is one of `KNOWN_EVENTS` (otherwise the caller answers 2xx and ignores it)."""
        return self.event in KNOWN_EVENTS


def _signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's `v1,<base64 HMAC-SHA256>` over `{delivery_id}.{timestamp}.{body}`."""
    mac = hmac.new(secret.encode("utf-8"), f"{delivery_id}.{timestamp}.".encode("utf-8") + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode('ascii')}"


def sign_delivery(secret: str, delivery_id: str, timestamp: Union[int, float, str], body: bytes) -> dict[str, str]:
    """The three headers MLflow sends with `body` (for tests and benchmarks)."""
    stamp = timestamp if isinstance(timestamp, str) else str(int(timestamp))
    return {DELIVERY_ID_HEADER: delivery_id, TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: _signature(secret, delivery_id, stamp, body)}


def _header(headers: Mapping[str, str], name: str, pattern: re.Pattern[str]) -> str:
    """A required header that must match `pattern` in full, else 400."""
    value = headers.get(name.lower())
    if value is None or not value.strip():
        raise WebhookRejected(400, f"missing {name} header")
    if not pattern.fullmatch(value.strip()):
        raise WebhookRejected(400, f"malformed {name} header {safe_repr(value, 40)}")
    return value.strip()


def verify_delivery(secret: str, headers: Mapping[str, str], body: bytes, *, now: float,
                    tolerance: float = 300.0) -> RegistryEvent:
    """Check a delivery's signature and freshness, then parse its event; raises WebhookRejected."""
    if not secret:
        raise ValueError("a webhook secret is required: with an empty one anyone could sign deliveries")
    lowered = {key.lower(): value for key, value in headers.items()}
    given = lowered.get(SIGNATURE_HEADER.lower(), "").strip()
    if not given:
        raise WebhookRejected(401, f"missing {SIGNATURE_HEADER} header")
    delivery_id = _header(lowered, DELIVERY_ID_HEADER, _DELIVERY_ID)
    stamp = _header(lowered, TIMESTAMP_HEADER, _TIMESTAMP)
    expected = _signature(secret, delivery_id, stamp, body)
    if not hmac.compare_digest(expected.encode("ascii"), given.encode("utf-8", "replace")):
        raise WebhookRejected(401, f"{SIGNATURE_HEADER} does not match this delivery (wrong secret or altered body)")
    skew = int(stamp) - now
    if abs(skew) > tolerance:
        raise WebhookRejected(400, f"{TIMESTAMP_HEADER} is {abs(skew):.0f} s in the {'future' if skew > 0 else 'past'}, "
                                   f"beyond the {tolerance:g} s tolerance")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise WebhookRejected(400, "body is not JSON") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) and doc[k] for k in ("entity", "action")):
        raise WebhookRejected(400, "body is not an MLflow webhook payload: it needs string 'entity' and 'action'")
    event = f"{doc['entity']}.{doc['action']}"
    data: Any = doc.get("data")
    if event in KNOWN_EVENTS:
        if not isinstance(data, dict):
            raise WebhookRejected(400, f"{event} body has no 'data' object")
        missing = [f for f in KNOWN_EVENTS[event] if not (isinstance(data.get(f), str) and data[f])]
        if missing:
            raise WebhookRejected(400, f"{event} body lacks {', '.join(missing)} in 'data'")
    data = data if isinstance(data, dict) else {}

    def field(key: str) -> Optional[str]:
        value = data.get(key)
        return value if isinstance(value, str) and value else None

    return RegistryEvent(delivery_id, event, field("name") or "", field("version"), field("alias"), float(stamp))
