"""A runner for any MLflow model with a `python_function` flavor: sklearn, xgboost, a custom PythonModel.

It gets the same resolution, digest checks, allow-list, load-beside-and-swap, gate and reporting as
the text classifier. Inputs are a list of strings. A model with `predict_proba` and `classes_`
(an sklearn classifier or pipeline) answers `{"label", "score"}` per input; any other answers
`{"label": str(prediction)}` (or the dict it returned).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from registry.errors import ArtifactError
from runners.base import Runner, pickle_refused

#: Flavors whose files load without unpickling (no code runs when they are read).
_PICKLE_FREE = frozenset({"python_function", "xgboost", "lightgbm", "onnx", "catboost"})


def unpickles(flavors: Mapping[str, Any]) -> bool:
    """Whether loading this MLflow model may unpickle (run code): sklearn does, a custom PythonModel does."""
    sklearn = flavors.get("sklearn")
    if isinstance(sklearn, Mapping):
        return sklearn.get("serialization_format", "cloudpickle") != "skops"
    pyfunc = flavors.get("python_function") or {}
    if isinstance(pyfunc, Mapping) and ("cloudpickle_version" in pyfunc or "python_model" in pyfunc):
        return True
    return not set(flavors) <= _PICKLE_FREE


class PyfuncRunner(Runner):
    """One MLflow pyfunc model version in memory."""

    form = "mlflow-pyfunc"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.flavors: list[str] = []
        self._model: Any = None
        self._raw: Any = None

    def build(self, location: Union[Path, str]) -> None:
        """Check the pickle rule, then load with `mlflow.pyfunc`."""
        from runners.forms import read_mlmodel

        if isinstance(location, str) or not (location / "MLmodel").is_file():
            raise ArtifactError(str(location), "not an MLflow model (no MLmodel file)")
        flavors = read_mlmodel(location)["flavors"]
        if "python_function" not in flavors:
            raise ArtifactError(str(location), f"no python_function flavor (found {', '.join(sorted(flavors))})")
        if unpickles(flavors) and not (self.record.sha256 or self.settings.allow_pickle):
            raise pickle_refused(self.record.location, f"the {', '.join(sorted(set(flavors) - {'python_function'}))} flavor")
        import mlflow.pyfunc

        self._model = mlflow.pyfunc.load_model(str(location))
        try:
            self._raw = self._model.get_raw_model()
        except Exception:  # noqa: BLE001 - a flavor without a raw model: predict through pyfunc
            self._raw = None
        self.flavors = sorted(flavors)

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
        return [p if isinstance(p, dict) else {"label": str(p.item() if hasattr(p, "item") else p)} for p in list(predictions)]

    def details(self) -> dict[str, Any]:
        return {"flavors": self.flavors}

    def release(self) -> None:
        self._model = self._raw = None
