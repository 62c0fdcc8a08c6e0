"""Adaptive batching in the worker: requests queue while the model is busy; the next pass takes them.

BentoML's own batchable APIs return one output per input item, so a batch could not also report
which model version produced it. This batcher belongs to one loaded model version: every
prediction of a batch comes from that version, and the response says so.

A worker can run several forward passes at once ("lanes", `REGISTRY_FORWARD_THREADS`), each on
its own batch and all on the one copy of the model in memory: while one lane is inside torch,
another tokenizes its batch or runs Python between torch calls. On a CPU that beats one pass
spread over several torch threads (see `forward_plan`).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable, Optional


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, lowered by a cgroup CPU quota (a container's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(Path("/sys/fs/cgroup"))
    return max(1, min(cpus, int(quota)) if quota else cpus)


def cgroup_cpu_quota(root: Path) -> Optional[float]:
    """CPUs a cgroup's quota allows (cgroup v2 `cpu.max`, else v1 `cpu/cpu.cfs_quota_us`), None without one."""
    try:  # v2: "<quota> <period>" or "max <period>"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1.0, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:  # v1: a quota of -1 means none
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else max(1.0, quota_us / period_us)
    except (OSError, ValueError):
        return None


def forward_plan(lanes: Optional[int], torch_threads: Optional[int], *, workers: int, cuda: bool,
                 cpus: Optional[int] = None) -> tuple[int, int]:
    """(forward lanes, torch threads) for one worker; a value given is kept, `None` is worked out.

    On a GPU one lane feeds the device. On a CPU the worker's share of the CPUs (`cpus / workers`)
    is split into two lanes when it has two or more, and the torch threads divide what is left:
    measured on 2 cores (README, "Measured figures"), two single-threaded passes at once beat one
    pass on two threads. Given values are kept as they are, even where workers x lanes x threads
    exceeds the CPUs.
    """
    share = max(1, (cpus or available_cpus()) // max(1, workers))
    if lanes is None:
        lanes = 1 if cuda else min(2, share)
    if torch_threads is None:
        torch_threads = max(1, share // lanes)
    return lanes, torch_threads


#: A lane about to start a pass on less than its even share of the outstanding texts, while another lane
#: computes, first waits a little for the rest of its share: at most this fraction of a recent pass, and at
#: most FILL_WAIT_MAX_S. In a closed loop the requests a finished pass answered come back a few at a time;
#: taking the first of them alone makes a run of small passes (measured: a mean pass of 10.6 texts at 32
#: clients where an even share is 16), and a small pass costs more per text than a full one.
FILL_WAIT_FRACTION = 0.1
FILL_WAIT_MAX_S = 0.02


class MicroBatcher:
    """Groups concurrent requests into forward passes of at most `max_texts` texts, `lanes` passes at once.

    `weigh(texts)` says what a request costs in those units when a text is not one model input (a
    long text read in several windows counts as its windows); default: one a text.
    """

    def __init__(self, predict: Callable[[list[str]], list[dict[str, Any]]], executor: Executor, *,
                 max_texts: int, wait_ms: float = 0.0, lanes: int = 1,
                 weigh: Optional[Callable[[list[str]], int]] = None):
        self._predict = predict
        self._weigh = weigh or len
        self._executor = executor
        self.max_texts = max_texts
        self.wait_s = wait_ms / 1000.0
        self.lanes = max(1, lanes)
        self._pending: deque[tuple[list[str], asyncio.Future, int]] = deque()  # texts, answer, cost
        self._draining = 0  # lanes with a drain task
        self._tasks: set[asyncio.Task] = set()
        self._in_flight = 0  # cost of the texts inside forward passes
        self._waiters: list[asyncio.Future] = []  # lanes waiting for their share to fill (woken by each arrival)
        self._pass_s = 0.0  # recent seconds per forward pass (moving average)
        self.batches = 0
        self.texts = 0

    async def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending.append((texts, future, max(1, self._weigh(texts))))
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()
        if self._draining < self.lanes:
            self._draining += 1
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._drained)  # also when cancelled before it ever ran
        return await future

    def _drained(self, task: Optional[asyncio.Task]) -> None:
        """A drain task is done: from its own `finally`, or (cancelled before it ever ran) its done callback."""
        if task in self._tasks:
            self._tasks.discard(task)
            self._draining -= 1

    def _take(self) -> list[tuple[list[str], asyncio.Future, int]]:
        """At least one request; more while they fit in one batch (a big request goes alone).

        With several lanes, a lane takes at most its even share of all outstanding texts (queued
        plus those in the other lanes' passes). Taking everything queued instead can lock into uneven
        lanes (measured: passes of 23 and 9 texts at 32 clients, a bimodal latency whose p99 was
        2.7x its p50): the lane that finished first keeps getting the few requests that came back.
        """
        limit = self.max_texts
        if self.lanes > 1:
            queued = sum(cost for _, _, cost in self._pending)
            limit = min(limit, max(1, -(-(queued + self._in_flight) // self.lanes)))
        batch = [self._pending.popleft()]
        size = batch[0][2]
        while self._pending and size + self._pending[0][2] <= limit:
            batch.append(self._pending.popleft())
            size += batch[-1][2]
        return batch

    def _short_of_share(self) -> bool:
        """Whether another lane computes while fewer texts are queued than this lane's even share."""
        if self.lanes == 1 or not self._in_flight:
            return False
        queued = sum(cost for _, _, cost in self._pending)
        return queued < min(self.max_texts, -(-(queued + self._in_flight) // self.lanes))

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait (briefly, see FILL_WAIT_FRACTION) while this lane's share is still arriving."""
        cap = min(FILL_WAIT_MAX_S, FILL_WAIT_FRACTION * self._pass_s)
        deadline = loop.time() + cap
        while cap > 0 and self._short_of_share():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                return
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if self.wait_s:
                    await asyncio.sleep(self.wait_s)
                    if not self._pending:
                        break
                await self._fill(loop)
                batch = [(t, f, c) for t, f, c in self._take() if not f.cancelled()]
                if not batch:
                    continue
                flat = [text for texts, _, _ in batch for text in texts]
                cost = sum(c for _, _, c in batch)
                self._in_flight += cost
                started = loop.time()
                try:
                    results = await loop.run_in_executor(self._executor, self._predict, flat)
                    self._pass_s = 0.8 * self._pass_s + 0.2 * (loop.time() - started) if self._pass_s else loop.time() - started
                    if not isinstance(results, list) or len(results) != len(flat):
                        raise RuntimeError(f"the model answered {len(results) if isinstance(results, list) else type(results).__name__}"
                                           f" for {len(flat)} inputs")
                except asyncio.CancelledError:  # the loop is closing: nobody waits for these answers
                    for _, future, _ in batch:
                        future.cancel()
                    raise
                except Exception as exc:  # the error belongs to every request of the batch
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                finally:
                    self._in_flight -= cost
                self.batches += 1
                self.texts += len(flat)
                offset = 0
                for texts, future, _ in batch:
                    if not future.done():
                        future.set_result(results[offset:offset + len(texts)])
                    offset += len(texts)
        finally:
            self._drained(asyncio.current_task())  # now, before another request can see the lane as busy
