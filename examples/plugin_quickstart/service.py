"""The plugin quickstart: one model the registry chain names, served by BentoML, with the admin routes.

    cd examples/plugin_quickstart && bentoml serve service:Phishing

Its settings are the plugin's environment variables (every one, with its default, is in the README):

    MLFLOW_TRACKING_URI=http://mlflow:5000       # the registry; the model is registered as security_phishing
    REGISTRY_MLFLOW_PREFIX=security_             # the registered model's prefix (the default)
    REGISTRY_REDIS_URL=redis://redis:6379/0      # optional: the shared cache and the reload bus
    REGISTRY_BACKUP_PATH=data/model_registry.json
    REGISTRY_ALIAS=latest                        # or best, another alias, a version
    REGISTRY_ADMIN_TOKEN=change-me               # POST /reload and the detail of GET /models; unset: reload answers 403

`ModelHost(models=[...])` names the model here instead of `REGISTRY_MODELS`; the runner is chosen
from the artifact (a transformers or pytorch text classifier, any other MLflow flavor through pyfunc).
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
from pydantic import Field

from registry.errors import RegistryError
from serving.admin import error, error_response, registry_admin
from serving.host import ModelHost

#: What one request may hold: checked before the model sees it (a body that breaks it: 400 naming the field).
Texts = Annotated[list[Annotated[str, Field(max_length=10_000)]], Field(min_length=1, max_length=64)]


@registry_admin(json_routes=("/classify",))  # /reload, /models, /registry/health, /registry/webhook; /readyz waits for the model
@bentoml.service(name="phishing", traffic={"timeout": 60})
class Phishing:
    """Classifies texts with the version of `phishing` the registry names, and follows the registry."""

    host = ModelHost(models=["phishing"])

    @bentoml.api(route="/classify")
    async def classify(self, texts: Texts) -> dict[str, Any]:
        if not all(text.strip() for text in texts):
            return error(400, "every text must hold something besides white space")
        try:
            served = self.host.get("phishing")  # the version this request keeps until it answers
        except RegistryError as exc:  # still loading (503): the answer says why
            return error_response(exc)
        return {"model": served.identity(), "predictions": await served.predict(texts)}
