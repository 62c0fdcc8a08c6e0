"""Adaptive batching in the worker: requests queue while the model is busy; the next pass takes them.

BentoML's own batchable APIs return one output per input item, so a batch could not also report
which model version produced it. This batcher belongs to one loaded model version: every
prediction of a batch comes from that version, and the response says so.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor
from typing import Any, Callable, Optional


class MicroBatcher:
    """Groups concurrent requests into forward passes of at most `max_texts` texts."""

    def __init__(self, predict: Callable[[list[str]], list[dict[str, Any]]], executor: Executor, *,
                 max_texts: int, wait_ms: float = 0.0):
        self._predict = predict
        self._executor = executor
        self.max_texts = max_texts
        self.wait_s = wait_ms / 1000.0
        self._pending: deque[tuple[list[str], asyncio.Future]] = deque()
        self._draining = False
        self.batches = 0
        self.texts = 0

    async def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending.append((texts, future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[str], asyncio.Future]]:
        """At least one request; more while they fit in one batch (a big request goes alone)."""
        batch = [self._pending.popleft()]
        size = len(batch[0][0])
        while self._pending and size + len(self._pending[0][0]) <= self.max_texts:
            texts, future = self._pending.popleft()
            batch.append((texts, future))
            size += len(texts)
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if self.wait_s:
                    await asyncio.sleep(self.wait_s)
                batch = [(t, f) for t, f in self._take() if not f.cancelled()]
                if not batch:
                    continue
                flat = [text for texts, _ in batch for text in texts]
                try:
                    results: Optional[list[dict[str, Any]]] = await loop.run_in_executor(self._executor, self._predict, flat)
                except Exception as exc:  # the error belongs to every request of the batch
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.batches += 1
                self.texts += len(flat)
                offset = 0
                for texts, future in batch:
                    if not future.done():
                        future.set_result(results[offset:offset + len(texts)])
                    offset += len(texts)
        finally:
            self._draining = False
