"""The demo model's data: pieces, context corpus, honest split, compositions, gate set; the window
arithmetic shared with the runner; and `python -m training.demo --if-missing`, without training MiniLM."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from registry.settings import RegistrySettings
from tests.tiny_models import tiny_classifier
from training import demo
from training.data import compose, make_dataset


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


@pytest.fixture(scope="module")
def pieces():
    return compose.split_pieces()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.base_model_path())


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def test_every_row_has_a_group_and_groups_keep_one_label():
    rows = demo.load_dataset()
    assert all(r.get("group") for r in rows)
    labels: dict[str, set] = {}
    for r in rows:
        labels.setdefault(r["group"], set()).add(r["label"])
    assert all(len(v) == 1 for v in labels.values())
    assert sum(r["group"].startswith("hard:") for r in rows) >= 40


def test_context_corpus_is_varied_benign_and_separate_from_the_rows():
    context = compose.load_context()
    assert len(context) >= 12
    assert all(len(sentences) >= 15 for sentences in context.values()), {g: len(s) for g, s in context.items()}
    flat = [_normalized(s) for sentences in context.values() for s in sentences]
    assert len(flat) == len(set(flat))
    rows = {_normalized(r["text"]) for r in demo.load_dataset()}
    assert not rows & set(flat)


def test_pieces_are_split_before_composing_disjoint_and_stratified(pieces):
    train, test = pieces
    assert not set(train.injections) & set(test.injections)
    assert not set(train.safe) & set(test.safe)
    assert not set(train.sentences()) & set(test.sentences())
    assert set(test.hard) <= set(test.safe) and set(train.hard) <= set(train.safe) and test.hard
    # A group (one payload shared by template combinations) never straddles the split.
    side = {t: "test" for t in test.injections + test.safe} | {t: "train" for t in train.injections + train.safe}
    by_group: dict[str, set] = {}
    for r in demo.load_dataset():
        by_group.setdefault(r["group"], set()).add(side[r["text"]])
    assert all(len(v) == 1 for v in by_group.values())
    for genre in train.context:
        share = len(test.context[genre]) / (len(test.context[genre]) + len(train.context[genre]))
        assert share == pytest.approx(compose.TEST_FRACTION, abs=0.05), genre
    share = len(test.injections) / (len(test.injections) + len(train.injections))
    assert share == pytest.approx(compose.TEST_FRACTION, abs=0.05)
    assert compose.split_pieces() == pieces  # stable: a salted hash, no order or seed involved


def test_training_rows_are_seeded_varied_and_from_train_pieces_only(pieces):
    train, test = pieces
    rows = compose.training_rows(train, seed=1)
    assert rows == compose.training_rows(train, seed=1)
    assert rows != compose.training_rows(train, seed=2)
    kinds = Counter((r["kind"], r["label"]) for r in rows)
    assert kinds[("embedded", "INJECTION")] >= len(train.injections) and kinds[("document", "SAFE")] > 100
    assert kinds[("twin", "SAFE")] > 50 and kinds[("embedded", "SAFE")] > 100
    labels = Counter(r["label"] for r in rows)
    assert 0.35 <= labels["INJECTION"] / len(rows) <= 0.6
    embedded = [r for r in rows if r["kind"] == "embedded" and r["label"] == "INJECTION"]
    for r in embedded:
        piece = r["text"][r["span"][0]:r["span"][1]]
        assert piece in train.injections
    starts = sum(r["span"][0] == 0 for r in embedded)
    ends = sum(r["span"][1] == len(r["text"]) for r in embedded)
    assert starts > 50 and ends > 50 and len(embedded) - starts - ends > 50  # start, end and middle
    held_out = set(test.sentences()) | set(test.injections) | set(test.safe)
    text = "\n".join(r["text"] for r in rows)
    assert not [piece for piece in held_out if piece in text]


def test_length_rows_lay_out_each_bucket(pieces, tokenizer):
    _, test = pieces
    rows = compose.length_rows(test, per_bucket=8)
    assert rows == compose.length_rows(test, per_bucket=8)
    assert Counter(r["bucket"] for r in rows) == {b: 16 for b in compose.BUCKETS}
    sentences = test.sentences()
    for r in rows:
        start, end = r["span"]
        piece = r["text"][start:end]
        assert piece in (test.injections if r["label"] == "INJECTION" else test.safe)
        before, after = r["text"][:start], r["text"][end:]
        if r["bucket"].isdigit():
            assert after == "" and sum(before.count(s) for s in sentences) == int(r["bucket"])
        elif r["bucket"] == compose.PAST_512:
            assert _tokens(tokenizer, before) > 512
        else:
            assert start == 0 and _tokens(tokenizer, after) > 512
    # Hard negatives are among each bucket's benign texts.
    assert all(any(r["text"][r["span"][0]:r["span"][1]] in test.hard for r in rows if r["bucket"] == b and r["label"] == "SAFE")
               for b in compose.BUCKETS)


def test_gate_file_matches_its_generator_and_uses_held_out_pieces(pieces, tokenizer):
    train, test = pieces
    gate = compose.read_jsonl(compose.GATE_PATH)
    assert gate == compose.gate_rows()
    assert {r["label"] for r in gate} == {"SAFE", "INJECTION"}
    text = "\n".join(r["text"] for r in gate)
    # The delimiter attacks' benign prefixes are train-side rows of their own, and a template inside held-out injections.
    train_pieces = (set(train.injections) | set(train.safe) | set(train.sentences())) - set(make_dataset.DELIMITER_PREFIXES)
    seen = [p for p in train_pieces if p in text]
    assert not seen, seen[:3]
    short = [r for r in gate if _tokens(tokenizer, r["text"]) <= 254]
    assert len(short) >= 50
    past = 0
    for r in gate:
        if r["label"] != "INJECTION":
            continue
        at = max(r["text"].find(p) for p in test.injections)
        past += at > 0 and _tokens(tokenizer, r["text"][:at]) > 512
    assert past >= 10  # injections past 512 tokens, at the end of long benign text
    assert sum(r["label"] == "SAFE" and _tokens(tokenizer, r["text"]) > 512 for r in gate) >= 10


def test_window_cuts_match_the_runner():
    """The held-out figures read texts with the runner's `windows` arithmetic (runners/windows.py)."""
    from runners.windows import reading_for

    _, tokenizer = tiny_classifier()
    settings = RegistrySettings.from_env(long_text="windows")
    reading = reading_for(settings, tokenizer, 32, ("SAFE", "INJECTION"))
    for n in (1, 29, 30, 31, 52, 53, 54, 100, 257):
        ids = list(range(n))
        pieces, _ = reading.cut(0, ids, None)
        assert [p.ids for p in pieces] == [ids[s:s + 30] for s in demo._cut(n, 30)], n


def test_crop_to_windows_keeps_the_piece_and_fits_a_window(pieces, tokenizer):
    train, _ = pieces
    rows = [r for r in compose.training_rows(train, seed=3) if r["kind"] != "bare"]
    cropped = demo.crop_to_windows(tokenizer, rows, 256, random.Random(0))
    assert len(cropped) == len(rows)
    n_cropped = 0
    for row, out in zip(rows, cropped):
        assert _tokens(tokenizer, out["text"]) <= 254 + 2  # a cut between characters may re-tokenize a little differently
        if out.get("cropped"):
            n_cropped += 1
            if row["span"] and _tokens(tokenizer, row["text"][row["span"][0]:row["span"][1]]) < 200:
                assert row["text"][row["span"][0]:row["span"][1]] in out["text"]
        else:
            assert out == row
    assert n_cropped > 30


def test_length_metrics_per_bucket():
    rows = [{"label": "INJECTION", "bucket": "0"}, {"label": "INJECTION", "bucket": "0"}, {"label": "SAFE", "bucket": "0"},
            {"label": "INJECTION", "bucket": "past512"}, {"label": "SAFE", "bucket": "past512"}]
    m = demo.length_metrics(rows, [0.9, 0.2, 0.1, 0.7, 0.8])
    assert m["recall_0"] == 0.5 and m["fpr_0"] == 0.0 and m["recall_past512"] == 1.0 and m["fpr_past512"] == 1.0
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(2 / 3)


def test_window_scores_read_every_window_or_the_first(tokenizer):
    """With a stand-in model that flags one token, `windows` finds it past the first window and `truncate` does not."""
    import torch

    needle = tokenizer.convert_tokens_to_ids("password")

    class Flagger(torch.nn.Module):
        config = type("C", (), {"label2id": {"SAFE": 0, "INJECTION": 1}})()

        def forward(self, input_ids, attention_mask=None, **_):
            hit = (input_ids == needle).any(dim=1).float() * 10
            return type("O", (), {"logits": torch.stack([torch.zeros_like(hit), hit - 5], dim=1)})()

    texts = ["hello " * 600 + "password", "password " + "hello " * 600, "hello " * 600]
    windows = demo.window_scores(Flagger(), tokenizer, texts, 256)
    truncate = demo.window_scores(Flagger(), tokenizer, texts, 256, mode="truncate")
    assert [s > 0.5 for s in windows] == [True, True, False]
    assert [s > 0.5 for s in truncate] == [False, True, False]


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


def test_save_dir_writes_what_registry_publish_takes(monkeypatch, tmp_path, capsys):
    """`--save-dir`: the trained model and tokenizer as a save_pretrained folder, no MLflow needed; publish loads it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model, tokenizer = tiny_classifier(seed=3)
    metrics = {"accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.9}
    monkeypatch.setattr(demo, "train", lambda config: demo.TrainingResult(model, tokenizer, metrics, {}))
    target = tmp_path / "my-model"
    assert demo.main(["--save-dir", str(target)]) == 0
    assert f"registry publish prompt_injection --model-dir {target} --metric f1=0.900" in capsys.readouterr().out
    loaded = AutoModelForSequenceClassification.from_pretrained(target)
    assert loaded.config.id2label == {0: "SAFE", 1: "INJECTION"}
    assert AutoTokenizer.from_pretrained(target)("hello")["input_ids"]
    with pytest.raises(SystemExit) as exc:  # never over a folder that holds something
        demo.main(["--save-dir", str(target)])
    assert exc.value.code == 2
