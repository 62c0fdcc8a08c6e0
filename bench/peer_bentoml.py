"""The plain BentoML peer: the same artifact behind `@bentoml.api(batchable=True)`, nothing else of this project.

Served by `bentoml serve bench.peer_bentoml:PlainClassifier` (bench/peers.py starts it). BentoML's
own adaptive batcher stacks the single-text requests into one list; the model pads the batch to its
longest text and runs one forward pass, as a user writing a BentoML service would. `BENCH_MODEL_DIR`
and `BENCH_TOKENIZER_DIR` name the artifact's weights and tokenizer, `BENCH_MAX_BATCH` the largest
batch (8: on this CPU small batches win when texts are padded to the longest), `BENCH_TORCH_THREADS`
torch's threads.
"""

from __future__ import annotations

import os

import bentoml


@bentoml.service(workers=1, traffic={"timeout": 120})
class PlainClassifier:
    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
        self.tokenizer = AutoTokenizer.from_pretrained(os.environ["BENCH_TOKENIZER_DIR"])
        self.model = AutoModelForSequenceClassification.from_pretrained(os.environ["BENCH_MODEL_DIR"]).eval()
        self.labels = self.model.config.id2label

    @bentoml.api(batchable=True, max_batch_size=int(os.environ.get("BENCH_MAX_BATCH", "8")), max_latency_ms=60000)
    def classify(self, texts: list[str]) -> list[dict]:
        import torch

        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        with torch.inference_mode():
            scores, indices = self.model(**encoded).logits.softmax(dim=-1).max(dim=-1)
        return [{"label": self.labels[i], "score": s} for i, s in zip(indices.tolist(), scores.tolist())]
