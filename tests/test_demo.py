"""The demo model's data set and `python -m training.demo --if-missing`, without training MiniLM."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from registry.settings import RegistrySettings
from tests.tiny_models import tiny_classifier
from training import demo
from training.data import make_dataset


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def test_dataset_loads_balanced_without_duplicates():
    rows = demo.load_dataset()
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == {"SAFE", "INJECTION"}
    assert 400 <= len(rows) <= 600
    assert 0.4 <= counts["INJECTION"] / len(rows) <= 0.6
    texts = [_normalized(r["text"]) for r in rows]
    duplicates = [t for t, n in Counter(texts).items() if n > 1]
    assert not duplicates


def test_dataset_file_matches_its_generator():
    assert make_dataset._rows() == demo.load_dataset()


def test_load_dataset_names_a_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "hi", "label": "SAFE"}) + "\n" + json.dumps({"text": "x", "label": "MAYBE"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        demo.load_dataset(path)


def test_split_is_seeded_stratified_and_disjoint():
    rows = demo.load_dataset()
    train, test = demo.split_dataset(rows, 0.2, seed=0)
    assert demo.split_dataset(rows, 0.2, seed=0) == (train, test)
    assert len(train) + len(test) == len(rows)
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    for label in demo.LABELS:
        share = sum(r["label"] == label for r in test) / sum(r["label"] == label for r in rows)
        assert share == pytest.approx(0.2, abs=0.01)


def test_binary_metrics():
    m = demo.binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert m == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert demo.binary_metrics([0, 0], [0, 0])["f1"] == 0.0


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store and file backup; cwd is tmp_path so ./mlruns lands there."""
    monkeypatch.chdir(tmp_path)
    for variable in ("REGISTRY_REDIS_URL", "REGISTRY_MLFLOW_PREFIX", "REGISTRY_TRAINING_API_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("REGISTRY_BACKUP_PATH", str(tmp_path / "model_registry.json"))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return tmp_path


def _no_training(*args, **kwargs):
    raise AssertionError("training.demo trained although a model is registered")


def test_if_missing_skips_when_a_version_is_registered(mlflow_env, monkeypatch, capsys):
    from training.publisher import Publisher

    model, tokenizer = tiny_classifier(seed=1)
    publisher = Publisher(RegistrySettings.from_env())
    try:
        publisher.publish("prompt_injection", model, tokenizer, {"f1": 0.5})
    finally:
        publisher.close()
    capsys.readouterr()
    monkeypatch.setattr(demo, "train", _no_training)

    started = time.perf_counter()
    assert demo.main(["--if-missing", "--name", "prompt_injection"]) == 0
    elapsed = time.perf_counter() - started

    out = capsys.readouterr().out
    assert "security_prompt_injection already has 1 version(s) (latest 1)" in out
    assert elapsed < 15, f"--if-missing took {elapsed:.1f} s"


def test_if_missing_trains_and_publishes_when_nothing_is_registered(mlflow_env, monkeypatch, capsys):
    """The publish path of main, with the MiniLM fine-tune replaced by a tiny random model."""
    model, tokenizer = tiny_classifier(seed=2)
    metrics = {"accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.9}
    monkeypatch.setattr(demo, "train", lambda config: demo.TrainingResult(model, tokenizer, metrics, {"epochs": config.epochs}))

    assert demo.main(["--if-missing", "--epochs", "1"]) == 0
    assert "published security_prompt_injection version 1 (alias best)" in capsys.readouterr().out
    backup = json.loads((mlflow_env / "model_registry.json").read_text())
    assert backup["latest_models"]["prompt_injection"]["metrics"] == metrics

    monkeypatch.setattr(demo, "train", _no_training)
    assert demo.main(["--if-missing"]) == 0
    assert "not training" in capsys.readouterr().out


def test_main_requires_a_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REGISTRY_MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--if-missing"])
    assert exc.value.code == 2
