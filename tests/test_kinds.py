"""Runner kinds from outside the project: a `Runner` subclass, registered by name, by class or by "module:Class"."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import pytest

from registry.errors import ArtifactError, SettingsError
from registry.record import ModelRecord, Resolution, Selector
from registry.resolver import Resolver
from registry.settings import RegistrySettings
from runners import Runner, register_runner
from runners.kinds import RUNNERS, runner_class, runner_factory
from serving.manager import ModelManager


class KeywordRunner(Runner):
    """The example of runners/base.py: flags texts holding a word of the artifact's words.txt."""

    form = "keywords"

    def build(self, location: Union[Path, str]) -> None:
        self.words = set((Path(location) / "words.txt").read_text().split())

    @property
    def labels(self) -> Sequence[str]:
        return ("SAFE", "INJECTION")

    def predict(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"label": "INJECTION" if set(t.lower().split()) & self.words else "SAFE", "score": 1.0} for t in inputs]


class SilentRunner(KeywordRunner):
    """Answers nothing: its warm-up must fail the load."""

    def predict(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        return []


def _artifact(tmp_path: Path) -> Path:
    (tmp_path / "words.txt").write_text("ignore reveal\n")
    return tmp_path


def _settings(tmp_path: Path) -> RegistrySettings:
    return RegistrySettings.from_env(models=["kw"], artifact_cache=tmp_path / "cache", backup_path=tmp_path / "backup.json",
                                     redis_url=None, training_api_url=None, mlflow_tracking_uri=None, fallback_models={})


def _record(location: Path) -> ModelRecord:
    return ModelRecord(name="kw", version="1", model_uri=str(location), artifact_uri=str(location), source="file")


def test_a_subclass_writes_build_and_predict_and_gets_the_rest(tmp_path: Path) -> None:
    location = _artifact(tmp_path)
    runner = KeywordRunner(_record(location), _settings(tmp_path), location=location)
    runner.load()
    assert runner.ready and runner.predict(["please IGNORE this", "hello"])[0]["label"] == "INJECTION"
    described = runner.describe()
    assert described["form"] == "keywords" and described["labels"] == ["SAFE", "INJECTION"] and described["version"] == "1"
    assert described["loaded_at"] and described["load_seconds"] is not None
    runner.close()
    assert not runner.ready


def test_a_failed_warm_up_is_an_artifact_error_naming_the_step(tmp_path: Path) -> None:
    location = _artifact(tmp_path)
    runner = SilentRunner(_record(location), _settings(tmp_path), location=location)
    with pytest.raises(ArtifactError, match="warm-up prediction as keywords failed: ValueError: 0 answers for 2 inputs"):
        runner.load()
    assert not runner.ready


def test_a_build_error_is_an_artifact_error(tmp_path: Path) -> None:
    runner = KeywordRunner(_record(tmp_path / "missing"), _settings(tmp_path), location=tmp_path / "missing")
    with pytest.raises(ArtifactError, match="loading as keywords failed: FileNotFoundError"):
        runner.load()


@pytest.mark.parametrize("choice", [KeywordRunner, "tests.test_kinds:KeywordRunner", "keywords-registered"])
def test_the_host_serves_a_kind_chosen_by_class_path_or_name(tmp_path: Path, choice: Any) -> None:
    register_runner("keywords-registered", KeywordRunner)
    try:
        location = _artifact(tmp_path)
        settings = _settings(tmp_path)
        manager = ModelManager(settings, Resolver.from_settings(settings), runner_factory(choice))
        try:
            resolution = Resolution(record=_record(location), trail=(), selector=Selector.parse("1"))
            _, served = manager.activate("kw", "1", resolution=resolution)
            assert isinstance(served.runner, KeywordRunner)
            assert served.runner.predict(["reveal it"])[0]["label"] == "INJECTION"
            assert served.batcher.lanes == 1, "a Runner is not thread_safe unless it says so"
        finally:
            manager.close()
    finally:
        RUNNERS.pop("keywords-registered", None)


@pytest.mark.parametrize("choice, says", [
    ("no-such-kind", "unknown runner kind; known: text-classification, mlflow-pyfunc"),
    ("tests.no_such_module:Runner", "cannot import it: ModuleNotFoundError"),
    ("tests.test_kinds:_artifact", "names a function, not a class"),
])
def test_a_runner_choice_that_names_nothing_is_a_settings_error(choice: str, says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        runner_class(choice)


def test_register_runner_takes_a_class() -> None:
    with pytest.raises(TypeError, match="takes a class"):
        register_runner("x", KeywordRunner(_record(Path("/nonexistent")), RegistrySettings.from_env()))  # type: ignore[arg-type]
