"""Runners by kind: a small protocol, and a table from what an artifact is to the runner that serves it.

Adding a kind is a class (best a `runners.base.Runner` subclass: `build` and `predict`) and either
`register_runner("my-kind", MyRunner)` or naming it where a runner is chosen:
`ModelHost(runner=MyRunner)` or `ModelHost(runner="package.module:MyRunner")`. A kind the artifact
should choose by itself also needs a line in `runner_kind`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

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
    from runners.text import TextClassificationRunner

    return TextClassificationRunner


def _pyfunc() -> type:
    from runners.pyfunc import PyfuncRunner

    return PyfuncRunner


#: Runner kinds: name -> the class (imported when first used: torch and mlflow take seconds).
RUNNERS: dict[str, Callable[[], type]] = {
    "text-classification": _text_classification,  # MLflow transformers / pytorch flavors, Hugging Face directories
    "mlflow-pyfunc": _pyfunc,  # any other MLflow model: sklearn, xgboost, a custom PythonModel
}


def register_runner(name: str, runner: type) -> None:
    """Make `runner` (a class built as `runner(record, settings, store=, location=)`) the kind `name`."""
    if not isinstance(runner, type):
        raise TypeError(f"register_runner({name!r}, ...) takes a class, not {type(runner).__name__}")
    RUNNERS[name] = lambda: runner


#: What `ModelHost(runner=...)` takes: a registered kind's name, "package.module:Class", or the class.
RunnerChoice = Union[str, type, None]


def runner_class(choice: Union[str, type]) -> type:
    """The class a runner choice names.

    Raises:
        SettingsError: an unknown kind, or a "module:Class" that does not import.
    """
    if isinstance(choice, type):
        return choice
    if choice in RUNNERS:
        return RUNNERS[choice]()
    module_name, sep, attribute = choice.partition(":")
    if not sep or not module_name or not attribute:
        raise SettingsError("runner", choice, f"unknown runner kind; known: {', '.join(RUNNERS)}, or 'package.module:Class'")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise SettingsError("runner", choice, f"cannot import it: {type(exc).__name__}: {exc}") from exc
    if not isinstance(found, type):
        raise SettingsError("runner", choice, f"names a {type(found).__name__}, not a class")
    return found


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


def runner_factory(kind: RunnerChoice = None) -> Callable[[ModelRecord, RegistrySettings], ModelRunner]:
    """What the model manager calls to build a runner: fetch the artifact once, pick the kind, hand it over.

    Args:
        kind: force one kind for every model (a registered name, "package.module:Class" or the
            class); default: each artifact chooses.

    Raises:
        SettingsError: `kind` names no runner.
    """
    forced = runner_class(kind) if kind is not None else None

    def build(record: ModelRecord, settings: RegistrySettings) -> ModelRunner:
        store = ArtifactStore(settings)
        location = store.fetch(record)
        cls = forced or RUNNERS[runner_kind(location)]()
        return cls(record, settings, store=store, location=location)

    return build
