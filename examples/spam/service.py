"""A second service built only on the plugin's public API: an sklearn spam filter logged to MLflow.

    cd examples/spam && bentoml serve service:SpamFilter

It gets what the security classifier gets — resolution through the registry chain, digest checks,
the allow-list, load beside and swap, following the registry, the gate, /reload, /models,
/registry/health and the webhook — by declaring a `ModelHost`.
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
from pydantic import Field

from registry.errors import RegistryError
from serving.admin import error, error_response, registry_admin
from serving.host import ModelHost


@registry_admin(json_routes=("/score",))  # a body that does not match score's signature: 400 naming the field
@bentoml.service(name="spam_filter", traffic={"timeout": 60})
class SpamFilter:
    """Scores texts with the `spam` model's version the registry names (registered as `<prefix>spam`)."""

    host = ModelHost(models=["spam"], runner="mlflow-pyfunc")  # the rest from REGISTRY_* and MLFLOW_* variables

    @bentoml.api(route="/score")
    async def score(self, texts: Annotated[list[str], Field(min_length=1, max_length=256)]) -> dict[str, Any]:
        if not all(t.strip() for t in texts):
            return error(400, "every text must be non-empty")
        try:
            served = self.host.get("spam")  # one snapshot per request
        except RegistryError as exc:  # still loading, or nothing loadable (503): say why (BentoML would answer 500)
            return error_response(exc)
        return {"model": served.identity(), "predictions": await served.predict(texts)}
