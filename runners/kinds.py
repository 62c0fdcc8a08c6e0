"""Runners by kind: a small protocol, and a table from what an artifact is to the runner that serves it.

Adding a kind is one module (a class with `load`, `predict`, `describe`, `close`) and one entry in
`RUNNERS` (plus a line in `runner_kind` if the artifact should choose it by itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

from registry.errors import ArtifactError, SettingsError
from registry.record import ModelRecord
from registry.settings import RegistrySettings
from runners.artifacts import ArtifactStore


class ModelRunner(Protocol):
    """One model version in memory. The host loads it beside the serving one, gates it, swaps it in."""

    record: ModelRecord
    ready: bool
    # Optional: `thread_safe = True` lets the host call predict from several forward threads at
    # once (REGISTRY_FORWARD_THREADS); a runner without it gets one.

    def load(self) -> None:
        """Fetch, verify, build and warm up; raises ArtifactError saying why it could not."""

    def predict(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        """One answer per input, in order; a classifier answers `{"label", "score"}` (the gate reads `label`)."""

    def describe(self) -> dict[str, Any]:
        """What `/models` says about the loaded version."""

    def close(self) -> None:
        """Give the memory back (the version was swapped out)."""


def _text_classification() -> type:
    from runners.runner import TextClassificationRunner

    return TextClassificationRunner


def _pyfunc() -> type:
    from runners.pyfunc import PyfuncRunner

    return PyfuncRunner


#: Runner kinds: name -> the class (imported when first used: torch and mlflow take seconds).
RUNNERS: dict[str, Callable[[], type]] = {
    "text-classification": _text_classification,  # MLflow transformers / pytorch flavors, Hugging Face directories
    "mlflow-pyfunc": _pyfunc,  # any other MLflow model: sklearn, xgboost, a custom PythonModel
}


def runner_kind(location: Union[Path, str]) -> str:
    """The kind of runner a fetched artifact asks for, from its MLflow flavors (or its absence)."""
    if isinstance(location, str) or not (location / "MLmodel").is_file():
        return "text-classification"  # a hub id or a Hugging Face directory
    from runners.forms import read_mlmodel

    flavors = read_mlmodel(location)["flavors"]
    if "transformers" in flavors or "pytorch" in flavors:
        return "text-classification"
    if "python_function" in flavors:
        return "mlflow-pyfunc"
    raise ArtifactError(str(location), f"no runner for the MLflow flavors {', '.join(sorted(flavors))}")


def runner_factory(kind: Optional[str] = None) -> Callable[[ModelRecord, RegistrySettings], ModelRunner]:
    """What the model manager calls to build a runner: fetch the artifact once, pick the kind, hand it over.

    Args:
        kind: force one kind for every model; default: each artifact chooses.
    """
    if kind is not None and kind not in RUNNERS:
        raise SettingsError("runner", kind, f"unknown runner kind; known: {', '.join(RUNNERS)}")

    def build(record: ModelRecord, settings: RegistrySettings) -> ModelRunner:
        store = ArtifactStore(settings)
        location = store.fetch(record)
        return RUNNERS[kind or runner_kind(location)]()(record, settings, store=store, location=location)

    return build
