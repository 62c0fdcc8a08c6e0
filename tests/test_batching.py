"""The micro-batcher's forward lanes and the CPU plan behind them (REGISTRY_FORWARD_THREADS, REGISTRY_TORCH_THREADS)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from registry.errors import SettingsError
from registry.settings import RegistrySettings
from runners.batching import MicroBatcher, available_cpus, forward_plan


class Model:
    """A predict that records how many calls run at once and can hold every call at a gate."""

    def __init__(self, fail_on: str = ""):
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.fail_on = fail_on

    def predict(self, texts: list[str]) -> list[dict]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(list(texts))
        try:
            assert self.gate.wait(10), "the test never opened the gate"
            if self.fail_on in texts:
                raise ValueError(f"cannot classify {self.fail_on!r}")
            return [{"label": text.upper(), "score": 1.0} for text in texts]
        finally:
            with self.lock:
                self.running -= 1


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "state not reached before the deadline"
        await asyncio.sleep(0.005)


def _run(model: Model, lanes: int, requests: list[list[str]], max_texts: int = 32, hold: int = 1):
    """Submit every request at once; open the gate once `hold` forward passes are running."""

    async def main():
        with ThreadPoolExecutor(max_workers=lanes) as pool:
            batcher = MicroBatcher(model.predict, pool, max_texts=max_texts, lanes=lanes)
            tasks = [asyncio.ensure_future(batcher.predict(texts)) for texts in requests]
            await _until(lambda: model.running >= hold)
            model.gate.set()
            return await asyncio.gather(*tasks, return_exceptions=True), batcher

    return asyncio.run(main())


def test_two_lanes_run_two_batches_at_once_on_shares_of_the_queue():
    model = Model()
    requests = [[f"t{i}"] for i in range(32)]
    answers, batcher = _run(model, lanes=2, requests=requests, hold=2)  # the gate opens only once two passes run
    assert model.most == 2
    assert sorted(len(call) for call in model.calls[:2]) == [16, 16], "the queue is split between the idle lanes"
    assert [a[0]["label"] for a in answers] == [f"T{i}" for i in range(32)], "every request gets its own answer"
    assert batcher.texts == 32 and batcher.batches == len(model.calls)


def test_one_lane_never_overlaps_and_takes_the_whole_queue():
    model = Model()
    answers, _ = _run(model, lanes=1, requests=[[f"t{i}"] for i in range(40)], max_texts=32)
    assert model.most == 1
    assert [len(call) for call in model.calls] == [32, 8], "one lane takes up to max_texts of what queued"
    assert [a[0]["label"] for a in answers] == [f"T{i}" for i in range(40)]


def test_a_failing_batch_fails_only_its_own_requests():
    model = Model(fail_on="bad")
    answers, _ = _run(model, lanes=2, requests=[["bad"], ["a", "b"], ["c"]], hold=1)
    assert isinstance(answers[0], ValueError)
    batch_of = {text: i for i, call in enumerate(model.calls) for text in call}
    for texts, answer in zip((["a", "b"], ["c"]), answers[1:]):
        if batch_of[texts[0]] == batch_of["bad"]:
            assert isinstance(answer, ValueError)
        else:
            assert [p["label"] for p in answer] == [t.upper() for t in texts]


def test_a_request_larger_than_the_window_goes_alone_and_whole():
    model = Model()
    big = [f"x{i}" for i in range(50)]
    answers, _ = _run(model, lanes=2, requests=[big, ["y"]], max_texts=8)
    assert [p["label"] for p in answers[0]] == [t.upper() for t in big]
    assert big in model.calls


@pytest.mark.parametrize("lanes, threads, workers, cuda, cpus, plan", [
    (None, None, 1, False, 2, (2, 1)),   # 2 cores, one worker: two single-threaded lanes
    (None, None, 2, False, 2, (1, 1)),   # two workers share the cores
    (None, None, 1, False, 8, (2, 4)),
    (None, None, 1, False, 1, (1, 1)),
    (None, None, 1, True, 8, (1, 8)),    # a GPU gets one lane
    (1, None, 1, False, 2, (1, 2)),      # a value given is kept, the other fills the share
    (3, 5, 1, False, 2, (3, 5)),
])
def test_forward_plan(lanes, threads, workers, cuda, cpus, plan):
    assert forward_plan(lanes, threads, workers=workers, cuda=cuda, cpus=cpus) == plan


def test_available_cpus_is_at_least_one_and_at_most_the_affinity():
    import os

    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_thread_settings_take_auto_and_refuse_zero(monkeypatch):
    monkeypatch.setenv("REGISTRY_TORCH_THREADS", "auto")
    monkeypatch.setenv("REGISTRY_FORWARD_THREADS", "3")
    settings = RegistrySettings.from_env()
    assert settings.torch_threads is None and settings.forward_threads == 3
    monkeypatch.setenv("REGISTRY_FORWARD_THREADS", "0")
    with pytest.raises(SettingsError, match="REGISTRY_FORWARD_THREADS"):
        RegistrySettings.from_env()
