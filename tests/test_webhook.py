"""MLflow registry webhooks: signature, freshness and parsing units, then a real `mlflow server` delivering to a loopback receiver."""

from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

from registry.errors import WebhookRejected
from registry.webhook import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, RegistryEvent, sign_delivery, verify_delivery
from tests.helpers import serving

SECRET = "webhook-secret-\u00e9"
NOW = 1_760_000_000.0
DELIVERY = "5f0c6a53-0a4e-4a8e-9a57-0d4c3f1d2e6b"
EVENTS = ("model_version.created", "model_version_alias.created", "model_version_alias.deleted")
DEADLINE = 30.0


def mlflow_body(entity: str, action: str, data: dict[str, Any]) -> bytes:
    """A body built the way mlflow/webhooks/delivery.py builds it."""
    return json.dumps({"entity": entity, "action": action, "timestamp": "2025-10-09T08:53:20+00:00", "data": data}).encode()


ALIAS_SET = mlflow_body("model_version_alias", "created", {"name": "clf", "alias": "champion", "version": "3"})


def rejected(status: int, headers: dict[str, str], body: bytes = ALIAS_SET, now: float = NOW) -> str:
    with pytest.raises(WebhookRejected) as info:
        verify_delivery(SECRET, headers, body, now=now)
    assert info.value.status == status, info.value
    assert SECRET not in str(info.value)
    return info.value.reason


def test_valid_delivery_parses_each_known_event_with_headers_in_any_case():
    headers = {k.lower(): v for k, v in sign_delivery(SECRET, DELIVERY, NOW, ALIAS_SET).items()}
    assert verify_delivery(SECRET, headers, ALIAS_SET, now=NOW + 300) == RegistryEvent(
        DELIVERY, "model_version_alias.created", "clf", "3", "champion", NOW)
    created = mlflow_body("model_version", "created", {"name": "clf", "version": "4", "source": "s3://b/x", "run_id": None,
                                                       "tags": {}, "description": None})
    event = verify_delivery(SECRET, sign_delivery(SECRET, DELIVERY, NOW, created), created, now=NOW)
    assert (event.event, event.registered_name, event.version, event.alias, event.known) == (
        "model_version.created", "clf", "4", None, True)
    deleted = mlflow_body("model_version_alias", "deleted", {"name": "clf", "alias": "champion"})
    event = verify_delivery(SECRET, sign_delivery(SECRET, DELIVERY, NOW, deleted), deleted, now=NOW - 300)
    assert (event.event, event.registered_name, event.version, event.alias) == ("model_version_alias.deleted", "clf", None, "champion")


def test_signature_matches_mlflows_own_signer():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    assert sign_delivery(SECRET, DELIVERY, NOW, ALIAS_SET)[SIGNATURE_HEADER] == _generate_hmac_signature(
        SECRET, DELIVERY, str(int(NOW)), ALIAS_SET.decode())


def test_missing_signature_is_401():
    headers = sign_delivery(SECRET, DELIVERY, NOW, ALIAS_SET)
    del headers[SIGNATURE_HEADER]
    assert "missing X-MLflow-Signature" in rejected(401, headers)


def test_wrong_secret_is_401():
    assert "does not match" in rejected(401, sign_delivery("another-secret", DELIVERY, NOW, ALIAS_SET))


def test_altered_body_or_signed_headers_are_401():
    headers = sign_delivery(SECRET, DELIVERY, NOW, ALIAS_SET)
    rejected(401, headers, ALIAS_SET.replace(b"champion", b"champio2"))
    rejected(401, {**headers, TIMESTAMP_HEADER: str(int(NOW) + 1)})
    rejected(401, {**headers, DELIVERY_ID_HEADER: DELIVERY.upper()})
    rejected(401, {**headers, SIGNATURE_HEADER: headers[SIGNATURE_HEADER] + " " + headers[SIGNATURE_HEADER]})  # MLflow sends one


def test_stale_and_future_timestamps_are_400():
    assert "301 s in the past" in rejected(400, sign_delivery(SECRET, DELIVERY, NOW - 301, ALIAS_SET))
    assert "in the future" in rejected(400, sign_delivery(SECRET, DELIVERY, NOW + 301, ALIAS_SET))


@pytest.mark.parametrize("stamp", ["", "soon", "1.5e9", "-1760000000", "nan", "\u0661\u0662", "1" * 13])
def test_malformed_timestamp_is_400(stamp: str):
    assert TIMESTAMP_HEADER in rejected(400, sign_delivery(SECRET, DELIVERY, NOW, ALIAS_SET) | {TIMESTAMP_HEADER: stamp})


@pytest.mark.parametrize("delivery_id", [None, "", "a.b", "x" * 129])
def test_missing_or_malformed_delivery_id_is_400(delivery_id):
    headers = sign_delivery(SECRET, DELIVERY, NOW, ALIAS_SET)
    headers.pop(DELIVERY_ID_HEADER)
    if delivery_id is not None:
        headers[DELIVERY_ID_HEADER] = delivery_id
    assert DELIVERY_ID_HEADER in rejected(400, headers)


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe{", b"[1, 2]", b'{"entity": "model_version"}',
                                  mlflow_body("model_version_alias", "created", {"name": "clf", "alias": "best"}),
                                  json.dumps({"entity": "model_version", "action": "created", "data": []}).encode()])
def test_signed_body_that_is_not_a_known_event_payload_is_400(body: bytes):
    rejected(400, sign_delivery(SECRET, DELIVERY, NOW, body), body)


def test_unknown_event_parses_with_the_fields_present():
    body = mlflow_body("model_version_tag", "set", {"name": "clf", "version": "2", "key": "k", "value": "v"})
    event = verify_delivery(SECRET, sign_delivery(SECRET, DELIVERY, NOW, body), body, now=NOW)
    assert (event.event, event.registered_name, event.version, event.alias, event.known) == (
        "model_version_tag.set", "clf", "2", None, False)
    body = mlflow_body("budget_policy", "exceeded", {"budget_policy_id": "bp-1"})
    assert verify_delivery(SECRET, sign_delivery(SECRET, DELIVERY, NOW, body), body, now=NOW).registered_name == ""


class Receiver:
    """A loopback HTTP server that records every POST (headers and raw body) and answers 200."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.changed = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.changed:
                    outer.deliveries.append((dict(self.headers.items()), body))
                    outer.changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mlflow-webhook"

    def events(self, name: str) -> list[tuple[RegistryEvent, dict[str, Any]]]:
        """Every delivery so far for registered model `name`, verified, with its JSON body; call holding `changed`."""
        verified = [(verify_delivery(SECRET, h, b, now=time.time()), json.loads(b)) for h, b in self.deliveries]
        return [(event, doc) for event, doc in verified if event.registered_name == name]

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float = DEADLINE) -> None:
        with self.changed:
            if not self.changed.wait_for(done, timeout):
                pytest.fail(f"no {what} delivery within {timeout} s; received {[b[:200] for _, b in self.deliveries]}")


@contextmanager
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    with serving(rx.server):
        yield rx


def wait_until_live(client, rx: Receiver, probe: str) -> None:
    """MLflow caches each event's webhook list (1 s here): fire probe events until all three reach the receiver."""
    client.create_registered_model(probe)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        version = client.create_model_version(probe, source=f"s3://artifacts/webhook/{probe}").version
        client.set_registered_model_alias(probe, "probe", version)
        client.delete_registered_model_alias(probe, "probe")
        with rx.changed:
            if rx.changed.wait_for(lambda: {e.event for e, _ in rx.events(probe)} >= set(EVENTS), 1.5):
                return
    pytest.fail(f"the webhook never delivered all of {EVENTS} for the probe model within {DEADLINE} s")


@pytest.mark.servers
def test_real_mlflow_server_deliveries_verify_and_parse(mlflow_srv):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_srv.url, registry_uri=mlflow_srv.url)
    name = f"webhook-{uuid.uuid4().hex[:8]}"
    with receiver() as rx:
        hook = client.create_webhook(name=f"{name}-hook", url=rx.url, events=list(EVENTS), secret=SECRET)
        try:
            wait_until_live(client, rx, f"{name}-probe")
            client.create_registered_model(name)
            steps: list[tuple[Callable[[], Any], dict[str, Any]]] = [
                (lambda: client.create_model_version(name, source="s3://artifacts/webhook/v1"),
                 {"entity": "model_version", "action": "created", "data": {
                     "name": name, "version": "1", "source": "s3://artifacts/webhook/v1", "run_id": None, "tags": {},
                     "description": None}}),
                (lambda: client.create_model_version(name, source="s3://artifacts/webhook/v2", tags={"stage": "ci"}, description="second"),
                 {"entity": "model_version", "action": "created", "data": {
                     "name": name, "version": "2", "source": "s3://artifacts/webhook/v2", "run_id": None, "tags": {"stage": "ci"},
                     "description": "second"}}),
                (lambda: client.set_registered_model_alias(name, "champion", "1"),
                 {"entity": "model_version_alias", "action": "created", "data": {"name": name, "alias": "champion", "version": "1"}}),
                (lambda: client.set_registered_model_alias(name, "champion", "2"),  # the alias moves: "created" again
                 {"entity": "model_version_alias", "action": "created", "data": {"name": name, "alias": "champion", "version": "2"}}),
                (lambda: client.delete_registered_model_alias(name, "champion"),
                 {"entity": "model_version_alias", "action": "deleted", "data": {"name": name, "alias": "champion"}}),
            ]
            for count, (act, expected) in enumerate(steps, start=1):
                act()
                rx.wait_for(f"{expected['entity']}.{expected['action']}", lambda count=count: len(rx.events(name)) >= count)
            with rx.changed:
                received = rx.events(name)
        finally:
            client.delete_webhook(hook.webhook_id)

    assert [doc["data"] for _, doc in received] == [expected["data"] for _, expected in steps]
    for (event, doc), (_, expected) in zip(received, steps):
        assert set(doc) == {"entity", "action", "timestamp", "data"}
        assert (doc["entity"], doc["action"]) == (expected["entity"], expected["action"])
        data = expected["data"]
        assert (event.event, event.registered_name, event.version, event.alias) == (
            f"{doc['entity']}.{doc['action']}", name, data.get("version"), data.get("alias"))
        assert abs(event.timestamp - time.time()) < 120
    assert len({event.delivery_id for event, _ in received}) == len(received)
