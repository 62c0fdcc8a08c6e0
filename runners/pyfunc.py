"""A runner for any MLflow model with a `python_function` flavor: sklearn, xgboost, a custom PythonModel.

It gets the same resolution, digest checks, allow-list, load-beside-and-swap, gate and reporting as
the text classifier. Inputs are a list of strings. A model with `predict_proba` and `classes_`
(an sklearn classifier or pipeline) answers `{"label", "score"}` per input; any other answers
`{"label": str(prediction)}` (or the dict it returned).
"""

from __future__ import annotations

import gc
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from registry.errors import ArtifactError
from registry.record import ModelRecord
from registry.settings import RegistrySettings
from runners.artifacts import ArtifactStore

logger = logging.getLogger(__name__)

#: Flavors whose files load without unpickling (no code runs when they are read).
_PICKLE_FREE = frozenset({"python_function", "xgboost", "lightgbm", "onnx", "catboost"})
_WARMUP = ["warm-up", "a second, somewhat longer text to warm up the model with"]


def unpickles(flavors: Mapping[str, Any]) -> bool:
    """Whether loading this MLflow model may unpickle (run code): sklearn does, a custom PythonModel does."""
    sklearn = flavors.get("sklearn")
    if isinstance(sklearn, Mapping):
        return sklearn.get("serialization_format", "cloudpickle") != "skops"
    pyfunc = flavors.get("python_function") or {}
    if isinstance(pyfunc, Mapping) and ("cloudpickle_version" in pyfunc or "python_model" in pyfunc):
        return True
    return not set(flavors) <= _PICKLE_FREE


class PyfuncRunner:
    """One MLflow pyfunc model version in memory."""

    def __init__(self, record: ModelRecord, settings: RegistrySettings, *, store: Optional[ArtifactStore] = None,
                 location: Union[Path, str, None] = None, **_: Any):
        self.record = record
        self.settings = settings
        self.store = store or ArtifactStore(settings)
        self._location = location
        self.ready = False
        self.flavors: list[str] = []
        self.loaded_at: Optional[str] = None
        self.load_seconds: Optional[float] = None
        self._model: Any = None
        self._raw: Any = None

    def load(self) -> None:
        """Fetch (unless given), check the pickle rule, load with `mlflow.pyfunc`, warm up."""
        if self.ready:
            return
        from runners.forms import read_mlmodel

        start = time.perf_counter()
        location = self._location if self._location is not None else self.store.fetch(self.record)
        if isinstance(location, str) or not (location / "MLmodel").is_file():
            raise ArtifactError(str(location), "not an MLflow model (no MLmodel file)")
        flavors = read_mlmodel(location)["flavors"]
        if "python_function" not in flavors:
            raise ArtifactError(str(location), f"no python_function flavor (found {', '.join(sorted(flavors))})")
        if unpickles(flavors) and not (self.record.sha256 or self.settings.allow_pickle):
            raise ArtifactError(self.record.location, f"the {', '.join(sorted(set(flavors) - {'python_function'}))} flavor unpickles "
                                "(runs code) when loaded, and the record has no sha256 to verify it against "
                                "(publish it with a digest, or set REGISTRY_ALLOW_PICKLE=true to trust it)")
        import mlflow.pyfunc

        try:
            self._model = mlflow.pyfunc.load_model(str(location))
            try:
                self._raw = self._model.get_raw_model()
            except Exception:  # noqa: BLE001 - a flavor without a raw model: predict through pyfunc
                self._raw = None
            self.flavors = sorted(flavors)
            answers = self.predict(_WARMUP)
        except ArtifactError:
            raise
        except Exception as exc:  # whatever the flavor raises: the artifact did not load or run
            self._model = self._raw = None
            raise ArtifactError(str(location), f"loading with mlflow.pyfunc failed: {type(exc).__name__}: {exc}") from exc
        if len(answers) != len(_WARMUP):
            raise ArtifactError(str(location), f"warm-up: {len(answers)} answers for {len(_WARMUP)} inputs")
        self.load_seconds = round(time.perf_counter() - start, 3)
        self.loaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.ready = True
        logger.info("[MLFLOW] loaded %s v%s (mlflow-pyfunc: %s) in %.2fs", self.record.name, self.record.version,
                    ", ".join(self.flavors), self.load_seconds)

    @property
    def labels(self) -> list[str]:
        classes = getattr(self._raw, "classes_", None)
        return [str(c) for c in classes] if classes is not None else []

    def predict(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        if self._model is None:
            raise RuntimeError(f"model {self.record.name} v{self.record.version} is not loaded: call load() first")
        texts = list(inputs)
        if not texts:
            return []
        raw = self._raw
        if raw is not None and hasattr(raw, "predict_proba") and getattr(raw, "classes_", None) is not None:
            probabilities = raw.predict_proba(texts)
            classes = raw.classes_
            return [{"label": str(classes[row.argmax()]), "score": float(row.max())} for row in probabilities]
        predictions = raw.predict(texts) if raw is not None and hasattr(raw, "predict") else self._model.predict(texts)
        if hasattr(predictions, "to_dict"):  # a DataFrame: one record per row
            predictions = predictions.to_dict(orient="records")
        return [p if isinstance(p, dict) else {"label": str(getattr(p, "item", lambda: p)())} for p in list(predictions)]

    def describe(self) -> dict[str, Any]:
        return {"name": self.record.name, "version": self.record.version, "source": self.record.source,
                "uri": self.record.location, "form": "mlflow-pyfunc", "flavors": self.flavors, "loaded_at": self.loaded_at,
                "load_seconds": self.load_seconds, "sha256": self.record.sha256, "labels": self.labels, "ready": self.ready}

    def close(self) -> None:
        self.ready = False
        self._model = self._raw = None
        gc.collect()
