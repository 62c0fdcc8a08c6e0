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
from typing import Any, Mapping, Optional

from registry.digest import tree_sha256
from registry.errors import PublishError, SourceUnavailable
from registry.record import BEST, ModelRecord, Selector
from registry.settings import RegistrySettings
from registry.sources.file_backup import FileBackupSource
from registry.sources.mlflow_registry import TAG_ARTIFACT_URI, TAG_METRICS, TAG_SHA256, MLflowRegistrySource, mlflow_uris
from registry.sources.payload_source import write_all
from registry.sources.redis_cache import RedisCacheSource

logger = logging.getLogger(__name__)

FLAVORS = ("transformers", "pytorch-pickle", "pytorch-pt2")

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

        example = tokenizer(["an example input", "a second, longer example input text"], padding="max_length", max_length=16, truncation=True, return_tensors="np")
        inputs = (example["input_ids"].astype(np.int64), example["attention_mask"].astype(np.int64))
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1), "input_ids"), TensorSpec(np.dtype(np.int64), (-1, -1), "attention_mask")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.config.num_labels), "logits")]),
        )
        return mlflow.pytorch.log_model(
            pytorch_model=_LogitsOnly.wrap(model),
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
        self.mlflow = MLflowRegistrySource.from_settings(settings)
        assert self.mlflow is not None
        self.cache = RedisCacheSource.from_settings(settings)
        self.backup = FileBackupSource.from_settings(settings)

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
        """Log, register, tag, move `best` if earned, then refresh cache and backup."""
        if flavor not in FLAVORS:
            raise PublishError(f"unknown flavor {flavor!r}; use one of {', '.join(FLAVORS)}")
        registered = self.mlflow.registered_name(name)
        client = self.mlflow.client
        with mlflow_uris(self.settings.mlflow_tracking_uri):
            return self._publish(name, registered, client, model, tokenizer, metrics, flavor, primary_metric, greater_is_better, params)

    def _publish(self, name: str, registered: str, client: Any, model: Any, tokenizer: Any, metrics: Mapping[str, float],
                 flavor: str, primary_metric: str, greater_is_better: bool, params: Optional[Mapping[str, Any]]) -> PublishResult:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            self._experiment(registered)
            with mlflow.start_run(run_name=f"{name}-{flavor}") as run:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
                mlflow.log_params({"flavor": flavor, **dict(params or {})})
                info = _log_model(flavor, model, tokenizer, registered)
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

    def refresh(self, name: str, version: Optional[str] = None) -> ModelRecord:
        """Rebuild the model's section from MLflow and write it to the cache and the backup."""
        section = self.mlflow.section(name)
        if section is None:
            raise PublishError(f"model {name!r} is not registered in MLflow")
        write_all((self.cache, self.backup), lambda target: target.store_section(section), "refresh after publishing failed")
        wanted = version or (section.latest.version if section.latest else None)
        return next(r for r in section.versions if r.version == wanted)

    def close(self) -> None:
        for source in (self.mlflow, self.cache, self.backup):
            if source is not None:
                source.close()

