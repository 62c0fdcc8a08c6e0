"""Create (or update) MLflow's registry webhook that makes the classifiers follow the registry.

    MLFLOW_TRACKING_URI=http://mlflow:5000 REGISTRY_WEBHOOK_SECRET=... \
    WEBHOOK_URL=http://classifier-1:3000/registry/webhook python create_webhook.py

The events are those `POST /registry/webhook` acts on (README "Following the registry"); the
secret is the classifiers' REGISTRY_WEBHOOK_SECRET. Running it again updates the webhook in place.
"""

from __future__ import annotations

import os
import sys

from mlflow import MlflowClient

NAME = "security-classifier"
EVENTS = ["model_version.created", "model_version_alias.created", "model_version_alias.deleted"]


def ensure_webhook(client: MlflowClient, url: str, secret: str, name: str = NAME) -> tuple[str, str]:
    """(webhook id, "created" | "updated")."""
    page_token = None
    while True:
        page = client.list_webhooks(page_token=page_token)
        for hook in page:
            if hook.name == name:
                client.update_webhook(hook.webhook_id, url=url, events=EVENTS, secret=secret)
                return hook.webhook_id, "updated"
        page_token = page.token
        if not page_token:
            break
    hook = client.create_webhook(name=name, url=url, events=EVENTS, secret=secret)
    return hook.webhook_id, "created"


def main() -> int:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    secret = os.environ.get("REGISTRY_WEBHOOK_SECRET", "")
    if not secret:
        raise SystemExit("REGISTRY_WEBHOOK_SECRET is empty: the classifiers would refuse every delivery")
    url = os.environ.get("WEBHOOK_URL", "http://classifier-1:3000/registry/webhook")
    webhook_id, what = ensure_webhook(MlflowClient(tracking_uri=uri, registry_uri=uri), url, secret)
    print(f"webhook {NAME} ({webhook_id}) {what}: {url}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
