"""The write side: register a trained classifier in MLflow, move `best`, refresh cache and backup.

What the seed's `save_model_registry` and `_add_model_aliases` meant, for MLflow 3:
- the alias `latest` is reserved by MLflow and never set; `latest` means the highest version;
- `best` moves only when the new version's metric beats the current best's;
- the artifact's sha256 (over the files as stored) is recorded as a version tag, with the direct
  storage location and the metrics, so one `search_model_versions` call carries everything;
- `mlflow.pytorch.log_model` defaults to `pt2`, which needs an input example and a tensor
  signature; the seed's pickle form is kept as an explicit choice.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from registry.digest import tree_sha256
from registry.errors import PublishError, SourceUnavailable
from registry.record import BEST, ModelRecord, Selector
from registry.settings import RegistrySettings
from registry.coordination import CHANGED, CoordinationError, ReloadBus, worker_id
from registry.mlflow_env import mlflow_uris
from registry.resolver import Resolver
from registry.sources.mlflow_registry import TAG_ARTIFACT_URI, TAG_METRICS, TAG_SHA256, MLflowRegistrySource

logger = logging.getLogger(__name__)

FLAVORS = ("transformers", "pytorch-pickle", "pytorch-pt2", "pytorch-pt2-hf")

#: What the served model needs at load time; passed explicitly so MLflow does not pin packages
#: that are not installed (torchvision).
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0"]


@dataclass(frozen=True)
class PublishResult:
    record: ModelRecord
    best_moved: bool
    previous_best: Optional[str]


class _LogitsOnly:
    """Wraps a sequence-classification model as `(input_ids, attention_mask) -> logits` for torch.export."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class LogitsOnly(torch.nn.Module):
            def __init__(self, inner: Any):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        return LogitsOnly(model).eval()


def _log_model(flavor: str, model: Any, tokenizer: Any, registered: str) -> Any:
    import mlflow

    if flavor == "transformers":
        return mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-classification",
            registered_model_name=registered,
            pip_requirements=PIP_REQUIREMENTS,
        )
    with tempfile.TemporaryDirectory() as tmp:
        # The seed's form: tokenizer files (and config.json, for the labels) as extra files.
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        extra_files = sorted(str(p) for p in Path(tmp).iterdir() if p.is_file())
        if flavor == "pytorch-pickle":
            return mlflow.pytorch.log_model(
                pytorch_model=model,
                name="model",
                serialization_format="pickle",
                extra_files=extra_files,
                registered_model_name=registered,
                pip_requirements=PIP_REQUIREMENTS,
            )
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        example = tokenizer(["an example input", "a second, longer example input text"], padding="max_length", max_length=16, truncation=True,
                            return_tensors="np")
        inputs = (example["input_ids"].astype(np.int64), example["attention_mask"].astype(np.int64))
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1), "input_ids"), TensorSpec(np.dtype(np.int64), (-1, -1), "attention_mask")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.config.num_labels), "logits")]),
        )
        # "pytorch-pt2-hf": the Hugging Face model itself, as MLflow 3 logs one by default; its program
        # returns a transformers ModelOutput (a pytree type) instead of bare logits.
        return mlflow.pytorch.log_model(
            pytorch_model=model if flavor == "pytorch-pt2-hf" else _LogitsOnly.wrap(model),
            name="model",
            serialization_format="pt2",
            input_example=inputs,
            signature=signature,
            extra_files=extra_files,
            registered_model_name=registered,
            pip_requirements=PIP_REQUIREMENTS,
        )


def _beats(new: Mapping[str, float], old: Mapping[str, float], metric: str, greater_is_better: bool) -> bool:
    if metric not in new:
        return False
    if metric not in old:
        return True
    return new[metric] > old[metric] if greater_is_better else new[metric] < old[metric]


class Publisher:
    """Registers trained models and keeps the cache and the file backup in step with MLflow."""

    def __init__(self, settings: RegistrySettings):
        if not settings.mlflow_tracking_uri:
            raise PublishError("MLFLOW_TRACKING_URI is not set: there is no registry to publish to")
        self.settings = settings
        # The layers the resolver reads, so a refresh writes exactly what a service will read.
        self.resolver = Resolver.from_settings(settings)
        assert self.resolver.authority is not None
        self.mlflow: MLflowRegistrySource = self.resolver.authority
        self.cache = self.resolver.cache
        self.backup = self.resolver.backup

    def publish(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        metrics: Mapping[str, float],
        *,
        flavor: str = "transformers",
        primary_metric: str = "f1",
        greater_is_better: bool = True,
        params: Optional[Mapping[str, Any]] = None,
    ) -> PublishResult:
        """Log a Hugging Face classifier, register, tag, move `best` if earned, refresh cache and backup, announce."""
        if flavor not in FLAVORS:
            raise PublishError(f"unknown flavor {flavor!r}; use one of {', '.join(FLAVORS)}")
        return self.publish_logged(name, lambda registered: _log_model(flavor, model, tokenizer, registered), metrics,
                                   label=flavor, primary_metric=primary_metric, greater_is_better=greater_is_better, params=params)

    def publish_logged(
        self,
        name: str,
        log: Callable[[str], Any],
        metrics: Mapping[str, float],
        *,
        label: str = "model",
        primary_metric: str = "f1",
        greater_is_better: bool = True,
        params: Optional[Mapping[str, Any]] = None,
    ) -> PublishResult:
        """Publish any MLflow model: `log(registered_name)` logs and registers it inside the run and
        returns MLflow's ModelInfo, e.g. `lambda r: mlflow.sklearn.log_model(pipe, name="model", registered_model_name=r)`.
        The rest is as `publish`: digest, tags, `best`, cache and backup, announcement."""
        registered = self.mlflow.registered_name(name)
        client = self.mlflow.client
        with mlflow_uris(self.settings.mlflow_tracking_uri):
            return self._publish(name, registered, client, log, label, metrics, primary_metric, greater_is_better, params)

    def _publish(self, name: str, registered: str, client: Any, log: Callable[[str], Any], label: str, metrics: Mapping[str, float],
                 primary_metric: str, greater_is_better: bool, params: Optional[Mapping[str, Any]]) -> PublishResult:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            self._experiment(registered)
            with mlflow.start_run(run_name=f"{name}-{label}") as run:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
                mlflow.log_params({"flavor": label, **dict(params or {})})
                info = log(registered)
            version = str(info.registered_model_version)
            artifact_uri = client.get_logged_model(info.model_id).artifact_location
            with tempfile.TemporaryDirectory() as tmp:
                # Digest what a loader will fetch, not what we think we uploaded.
                local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp)
                sha256 = tree_sha256(local)
            clean_metrics = {k: float(v) for k, v in metrics.items()}
            client.set_model_version_tag(registered, version, TAG_SHA256, sha256)
            client.set_model_version_tag(registered, version, TAG_ARTIFACT_URI, artifact_uri)
            client.set_model_version_tag(registered, version, TAG_METRICS, json.dumps(clean_metrics, sort_keys=True))
            best_moved, previous_best = self._move_best(name, version, clean_metrics, primary_metric, greater_is_better)
        except MlflowException as exc:
            raise PublishError(f"[MLFLOW] publishing {registered}: {exc.message}") from exc
        except SourceUnavailable as exc:
            raise PublishError(f"[MLFLOW] publishing {registered}: {exc.reason}") from exc
        logger.info(
            "[MLFLOW] registered %s version %s (run %s, sha256 %s…)%s",
            registered, version, run.info.run_id, sha256[:12], f"; alias best -> {version}" if best_moved else "",
        )
        record = self.refresh(name, version)
        if record is None:
            raise PublishError(f"[MLFLOW] {registered} version {version} is registered but MLflow does not list it as READY")
        self.announce(name)
        return PublishResult(record, best_moved, previous_best)

    def _experiment(self, name: str) -> None:
        """Use (or create) the experiment; with a local sqlite store, artifacts go beside the database
        instead of `./mlruns` in whatever directory the command ran from."""
        import mlflow
        from mlflow.exceptions import MlflowException

        uri = self.settings.mlflow_tracking_uri or ""
        if mlflow.get_experiment_by_name(name) is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
            try:
                mlflow.create_experiment(name, artifact_location=location)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another publisher created it first
                    raise
        mlflow.set_experiment(name)

    def _move_best(self, name: str, version: str, metrics: Mapping[str, float], metric: str, greater: bool) -> tuple[bool, Optional[str]]:
        # The current best as the MLflow layer reads it: metrics from our tag, or from its run.
        answer = self.mlflow.lookup(name, Selector("alias", BEST))
        current = answer.record if answer else None
        if current is not None and current.version == version:
            return False, version
        if current is None or _beats(metrics, current.metrics, metric, greater):
            self.mlflow.client.set_registered_model_alias(self.mlflow.registered_name(name), BEST, version)
            return True, current.version if current else None
        return False, current.version

    def refresh(self, name: str, version: Optional[str] = None) -> Optional[ModelRecord]:
        """Make the cache and the backup say what MLflow says of the model (deleted versions go).

        Returns the record of `version` (default: the latest), None when MLflow holds no version.
        """
        try:
            section = self.resolver.refresh_from_authority(name)
        except SourceUnavailable as exc:
            raise PublishError(f"[MLFLOW] reading {self.mlflow.registered_name(name)}: {exc.reason}") from exc
        if section is None:
            return None
        wanted = version or (section.latest.version if section.latest else None)
        return next((r for r in section.versions if r.version == wanted), None)

    def promote(self, name: str, version: str, alias: str = BEST) -> ModelRecord:
        """Point `alias` at `version`, refresh cache and backup, and tell the services."""
        selector = Selector.parse(alias)
        if selector.kind != "alias":
            raise PublishError(f"{alias!r} cannot be set as an alias ('latest' is the highest version, and numbers are versions)")
        registered = self.mlflow.registered_name(name)
        self._mlflow_call(f"moving alias {alias} of {registered} to version {version}",
                          self.mlflow.client.set_registered_model_alias, registered, alias, str(version))
        logger.info("[MLFLOW] %s@%s -> version %s", registered, alias, version)
        record = self.refresh(name, str(version))
        if record is None:
            raise PublishError(f"[MLFLOW] {registered} version {version} is not a READY version")
        self.announce(name)
        return record

    def revoke(self, name: str, version: str, *, alias: Optional[str] = None, primary_metric: str = "f1",
               greater_is_better: bool = True) -> dict[str, Any]:
        """Take a version out of service.

        With `alias`, only that alias is removed from the version. Without, the version is deleted
        from MLflow (its aliases go with it) and `best` moves to the best version left. Either way
        the cache and the backup are refreshed (the version is purged from both) and the services
        are told.
        """
        registered = self.mlflow.registered_name(name)
        client = self.mlflow.client
        mv = self._mlflow_call(f"reading {registered} version {version}", client.get_model_version, registered, str(version))
        aliases = sorted(mv.aliases or ())
        if alias is not None:
            if alias not in aliases:
                raise PublishError(f"alias {alias!r} of {registered} does not point at version {version} (it has {aliases or 'none'})")
            self._mlflow_call(f"removing alias {alias}", client.delete_registered_model_alias, registered, alias)
            removed, deleted, best = [alias], False, None
        else:
            self._mlflow_call(f"deleting {registered} version {version}", client.delete_model_version, registered, str(version))
            removed, deleted, best = aliases, True, None
            if BEST in aliases:
                best = self._best_left(name, primary_metric, greater_is_better)
                if best is not None:
                    self._mlflow_call("moving alias best", client.set_registered_model_alias, registered, BEST, best)
        logger.info("[MLFLOW] revoked %s version %s: %s%s", registered, version,
                    "deleted" if deleted else f"alias {alias} removed", f"; alias best -> {best}" if best else "")
        self.refresh(name)
        generation = self.announce(name)
        return {"model": name, "version": str(version), "deleted": deleted, "aliases_removed": removed, "best": best,
                "announced": generation}

    def _best_left(self, name: str, metric: str, greater: bool) -> Optional[str]:
        section = self.mlflow.section(name)
        scored = [r for r in (section.versions if section else ()) if metric in r.metrics]
        if not scored:
            return None
        pick = max if greater else min
        return pick(scored, key=lambda r: (r.metrics[metric], r.version_number)).version

    def announce(self, name: str) -> Optional[int]:
        """Tell every service on the reload bus that the registry changed for `name`; the generation, or None.

        Services without a shared bus (no Redis, no REGISTRY_RELOAD_DIR) see the change at their next poll.
        """
        if not (self.settings.redis_url or self.settings.reload_dir):
            logger.info("[HYBRID] no shared reload bus configured: services see %s's change at their next poll", name)
            return None
        bus = ReloadBus.from_settings(self.settings)
        try:
            order = bus.announce(name, "", "", f"publisher@{worker_id()}", kind=CHANGED)
        except CoordinationError as exc:
            logger.warning("[HYBRID] could not announce the change of %s: %s (services see it at their next poll)", name, exc)
            return None
        finally:
            bus.close()
        logger.info("[HYBRID] announced the change of %s (generation %d)", name, order.generation)
        return order.generation

    def _mlflow_call(self, what: str, fn: Any, *args: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args)
        except MlflowException as exc:
            raise PublishError(f"[MLFLOW] {what}: {exc.message}") from exc

    def close(self) -> None:
        self.resolver.close()

