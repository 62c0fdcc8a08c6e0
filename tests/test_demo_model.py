"""The length-robust demo model itself: trained once (small: one epoch of fewer compositions), then
read by the service's runner in each REGISTRY_LONG_TEXT mode on held-out pieces."""

from __future__ import annotations

import pytest

from registry.record import ModelRecord
from tests.helpers import settings_for
from training import demo
from training.data import compose

pytestmark = pytest.mark.slow

#: One short epoch (about 680 compositions) with a higher learning rate: the defaults' rate over so few
#: steps learned nothing (every held-out text SAFE, measured). A few minutes on two cores.
SMALL = dict(epochs=1, scale=0.5, lr=2e-4, safe_weight=1.0, eval_per_bucket=8)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    demo._quiet_transformers()
    result = demo.train(demo.TrainingConfig(**SMALL))
    directory = tmp_path_factory.mktemp("demo-model")
    result.model.save_pretrained(directory)
    result.tokenizer.save_pretrained(directory)
    return result, directory


def _runner(directory, tmp_path, mode):
    from runners.text import TextClassificationRunner

    record = ModelRecord(name="prompt_injection", version="0", model_uri=str(directory), artifact_uri=str(directory),
                         source="huggingface")
    runner = TextClassificationRunner(record, settings_for(tmp_path, long_text=mode), location=directory)
    runner.load()
    return runner


def test_metrics_are_held_out_and_by_length(trained):
    result, _ = trained
    metrics = result.metrics
    for bucket in compose.BUCKETS:
        assert 0.0 <= metrics[f"recall_{bucket}"] <= 1.0 and 0.0 <= metrics[f"fpr_{bucket}"] <= 1.0
    assert {"accuracy", "precision", "recall", "f1"} <= set(metrics)
    assert metrics["recall_0"] >= 0.6, metrics  # it learned the task at all
    assert result.params["window_tokens"] == 256 and result.params["train_seconds"] > 0


def test_the_saved_tokenizer_sets_the_services_window(trained, tmp_path):
    _, directory = trained
    runner = _runner(directory, tmp_path, "windows")
    try:
        assert runner.reading.window == 256
    finally:
        runner.close()


def test_windows_catch_held_out_injections_past_512_tokens_that_truncate_misses(trained, tmp_path):
    _, directory = trained
    _, test = compose.split_pieces()
    rows = [r for r in compose.length_rows(test, per_bucket=12, buckets=(compose.PAST_512,)) if r["label"] == "INJECTION"]
    texts = [r["text"] for r in rows]
    answers = {}
    for mode in ("windows", "truncate"):
        runner = _runner(directory, tmp_path, mode)
        try:
            answers[mode] = runner.predict(texts)
        finally:
            runner.close()
    caught = [a["label"] == "INJECTION" for a in answers["windows"]]
    missed_by_truncate = [a["label"] == "INJECTION" for a in answers["truncate"]]
    assert all(a["windows"] >= 3 for a in answers["windows"])
    assert all(a["truncated"] for a in answers["truncate"])
    # One short epoch catches about a third of these (measured 4 of 12); the defaults' model, 0.94-1.00
    # (bench robustness, training.demo's metrics). Truncate reads only benign text here: what it flags is a false positive.
    assert sum(caught) >= 0.25 * len(rows), answers["windows"]
    assert sum(caught) > sum(missed_by_truncate), (answers["windows"], answers["truncate"])
    # The winning window holds the injection, at least for some (a benign window may score higher:
    # long benign texts are the model's weak spot; measured 2 of 4 with this one-epoch model).
    on_target = [a["span"][0] < row["span"][1] and a["span"][1] > row["span"][0]
                 for row, a, hit in zip(rows, answers["windows"], caught) if hit]
    assert any(on_target), answers["windows"]
