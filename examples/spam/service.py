"""A second service built only on the plugin's public API: an sklearn spam filter logged to MLflow.

    cd examples/spam && bentoml serve service:SpamFilter

It gets what the security classifier gets — resolution through the registry chain, digest checks,
the allow-list, load beside and swap, following the registry, the gate, /reload, /models,
/registry/health and the webhook — by declaring a `ModelHost`.
"""

from __future__ import annotations

from typing import Any

import bentoml

from runners.admin import error, registry_admin
from runners.host import ModelHost


@registry_admin(json_routes=("/score",))
@bentoml.service(name="spam_filter", traffic={"timeout": 60})
class SpamFilter:
    """Scores texts with the `spam` model's version the registry names (registered as `<prefix>spam`)."""

    host = ModelHost(models=["spam"], runner="mlflow-pyfunc")  # the rest from REGISTRY_* and MLFLOW_* variables

    @bentoml.api(route="/score")
    async def score(self, texts: list[str]) -> dict[str, Any]:
        if not texts or len(texts) > 256 or not all(t.strip() for t in texts):
            return error(400, "'texts' must hold 1 to 256 non-empty strings")
        served = self.host.get("spam")  # one snapshot per request
        return {"model": served.identity(), "predictions": await served.predict(texts)}
