"""The micro-batcher's forward lanes and the CPU plan behind them (REGISTRY_FORWARD_THREADS, REGISTRY_TORCH_THREADS)."""

from __future__ import annotations

import asyncio
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from registry.errors import SettingsError
from registry.record import ModelRecord, Resolution, Selector
from registry.resolver import Resolver
from registry.settings import RegistrySettings
from serving.batching import MicroBatcher, available_cpus, cgroup_cpu_quota, forward_plan
from serving.manager import ModelManager
from runners.text import TextClassificationRunner
from tests.helpers import save_hf_dir, settings_for


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
    assert (batcher._draining, batcher._in_flight, batcher._tasks) == (0, 0, set()), "every lane is given back"


def test_one_lane_never_overlaps_and_takes_the_whole_queue():
    model = Model()
    answers, _ = _run(model, lanes=1, requests=[[f"t{i}"] for i in range(40)], max_texts=32)
    assert model.most == 1
    assert [len(call) for call in model.calls] == [32, 8], "one lane takes up to max_texts of what queued"
    assert [a[0]["label"] for a in answers] == [f"T{i}" for i in range(40)]


def test_a_failing_batch_fails_only_its_own_requests():
    model = Model(fail_on="bad")
    answers, _ = _run(model, lanes=2, requests=[["bad"], ["a", "b"], ["c"]], hold=1)
    assert model.calls[0] == ["bad"], "the failing request runs in a batch of its own (its lane's share of 4 texts is 2)"
    assert isinstance(answers[0], ValueError)
    assert [[p["label"] for p in answer] for answer in answers[1:]] == [["A", "B"], ["C"]]


def test_a_request_larger_than_the_window_goes_alone_and_whole():
    model = Model()
    big = [f"x{i}" for i in range(50)]
    answers, _ = _run(model, lanes=2, requests=[big, ["y"]], max_texts=8)
    assert [p["label"] for p in answers[0]] == [t.upper() for t in big]
    assert big in model.calls


def test_a_model_answering_the_wrong_number_of_results_fails_its_batch_not_the_lane():
    calls = []

    def short(texts: list[str]) -> list[dict]:
        calls.append(texts)
        return [] if len(calls) == 1 else [{"label": t, "score": 1.0} for t in texts]

    async def main():
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = MicroBatcher(short, pool, max_texts=8, lanes=1)
            first = await asyncio.gather(batcher.predict(["a"]), return_exceptions=True)
            second = await batcher.predict(["b"])
            return first, second, batcher

    (first,), second, batcher = asyncio.run(main())
    assert isinstance(first, RuntimeError) and "answered 0 for 1 inputs" in str(first)
    assert second == [{"label": "b", "score": 1.0}] and batcher._draining == 0


def test_a_drain_task_cancelled_before_it_ran_gives_its_lane_back():
    async def main():
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = MicroBatcher(lambda texts: [{"label": t} for t in texts], pool, max_texts=8, lanes=1)
            doomed = asyncio.ensure_future(batcher.predict(["a"]))
            await asyncio.sleep(0)  # the request is queued and its drain task created, not yet run
            for task in list(batcher._tasks):
                task.cancel()
            doomed.cancel()
            await _until(lambda: batcher._draining == 0, 5)
            return await asyncio.wait_for(batcher.predict(["b"]), 5)

    assert asyncio.run(main()) == [{"label": "b"}]


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "200000 100000\n"}, 2.0),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "50000 100000\n"}, 1.0),  # half a CPU still gets one thread
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota(tmp_path: Path, files: dict, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


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


# -- the real runner and manager -------------------------------------------------------------------

def _settings(tmp_path: Path, **values: object) -> RegistrySettings:
    return settings_for(tmp_path, models=["clf"], **values)


def _resolution(version: str, location: str) -> Resolution:
    record = ModelRecord(name="clf", version=version, model_uri=location, artifact_uri=location, source="file")
    return Resolution(record=record, trail=(), selector=Selector.parse(version))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_dir(tmp_path_factory.mktemp("hf"), seed=3)


def test_one_runner_predicts_from_two_threads_at_once(hf_dir: Path, tmp_path: Path):
    """Two lanes share one runner: encoding with and without padding at once must neither raise
    (a fast tokenizer's "Already borrowed") nor change any answer."""
    runner = TextClassificationRunner(_resolution("1", str(hf_dir)).record, _settings(tmp_path), device="cpu",
                                      location=str(hf_dir))
    runner.load()
    # Long texts keep each encode (the GIL released, the tokenizer borrowed) long enough to overlap.
    texts = [f"text number {i} " + "some words to encode " * (40 + i % 17) for i in range(48)]
    expected = runner.predict(texts)
    start = threading.Barrier(2)
    problems: list[BaseException] = []

    def lane(k: int) -> None:
        try:
            start.wait(10)
            for i in range(40):
                if (i + k) % 2:
                    runner.tokenize(texts[:8])  # padding=True, as the warm-up and the parity check ask
                else:
                    got = runner.predict(texts)  # no padding at encode time
                    assert [p["label"] for p in got] == [p["label"] for p in expected]
        except BaseException as exc:  # reported below, with the lane's own traceback
            problems.append(exc)

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a lane hung"
    assert not problems, problems


class _PlainRunner:
    """A runner kind that does not say its predict is thread-safe."""

    def __init__(self, record: ModelRecord, settings: RegistrySettings, **_: object):
        self.record, self.ready = record, False

    def load(self) -> None:
        self.ready = True

    def predict(self, inputs):
        return [{"label": "X", "score": 1.0} for _ in inputs]

    def describe(self):
        return {"version": self.record.version}

    def close(self) -> None:
        self.ready = False


def test_lanes_go_to_thread_safe_runners_only_and_the_heap_is_frozen_once(hf_dir: Path, tmp_path: Path):
    settings = _settings(tmp_path, forward_threads=2, torch_threads=1)
    kinds = {"1": TextClassificationRunner, "2": _PlainRunner, "3": TextClassificationRunner}
    manager = ModelManager(settings, Resolver.from_settings(settings),
                           lambda record, s: kinds[record.version](record, s, device="cpu", location=str(hf_dir)))
    try:
        frozen_before = gc.get_freeze_count()
        _, first = manager.activate("clf", "1", resolution=_resolution("1", str(hf_dir)))
        assert first.batcher.lanes == 2 and first.describe()["forward_threads"] == 2
        frozen = gc.get_freeze_count()
        assert frozen > frozen_before, "the first load froze the heap"
        _, second = manager.activate("clf", "2", resolution=_resolution("2", str(hf_dir)))
        assert second.batcher.lanes == 1, "a runner without thread_safe gets one lane"
        _, third = manager.activate("clf", "3", resolution=_resolution("3", str(hf_dir)))
        assert third.batcher.lanes == 2
        assert gc.get_freeze_count() <= frozen, "later loads leave the heap to the collector (frozen objects only get freed)"
    finally:
        manager.close()
        gc.unfreeze()


@pytest.mark.parametrize("variable, value, says", [
    ("REGISTRY_FORWARD_THREADS", "0", "greater than or equal to 1"),
    ("REGISTRY_TORCH_THREADS", "lots", "valid integer"),
    ("REGISTRY_LONG_TEXT", "chunks", "use one of windows, truncate, head_tail"),
    ("REGISTRY_WINDOW_STRIDE", "512", "must be less than the window (512 tokens"),
    ("REGISTRY_WINDOW_TOKENS", "4096", "less than or equal to 512"),
])
def test_a_bad_serving_setting_stops_the_service_with_one_line(variable: str, value: str, says: str):
    """`bentoml serve` imports service.py first: a bad value ends it there, one line naming the variable."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    proc = subprocess.run([sys.executable, "-c", "import service"], cwd=repo, env={**env, variable: value},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"[HYBRID] cannot start: {variable}='{value}'" in proc.stderr and says in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
