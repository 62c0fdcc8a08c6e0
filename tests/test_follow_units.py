"""Units behind following the registry: settings, the supervised loops, the reload buses, the
circuit breaker, and the resolver's finality against real MLflow (+ S3) and Redis.

Nothing here sleeps to synchronise: waiting is polling to a deadline (`poll_until`), or joining a
thread with a timeout. Tests that need servers use the session fixtures, each with a model name
or a key prefix of its own, so no test depends on what another left behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import redis

from registry.coordination import CoordinationError, FileReloadBus, RedisReloadBus, ReloadBus
from registry.errors import ModelNotResolvable, SettingsError
from registry.payload import ModelSection, RegistryPayload
from registry.record import ModelRecord, Selector
from registry.resolver import Resolver
from registry.settings import RegistrySettings
from registry.signing import PayloadCodec
from registry.sources.base import CircuitBreaker
from registry.sources.file_backup import FileBackupSource
from serving.host import supervised
from tests.helpers import dead_url, publish_tiny, settings_for
from tests.servers import free_port


def poll_until(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.01) -> Any:
    """Call `check` until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        threading.Event().wait(poll)


def outcomes(resolution_or_error) -> list[tuple[str, str]]:
    return [(a.source, a.outcome.value) for a in resolution_or_error.trail]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No REGISTRY_* variable leaks in from the shell running the tests."""
    import os

    for key in list(os.environ):
        if key.startswith("REGISTRY_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("models", ["a/b", "ok,a/b", "..", ".", "dup,dup", "x y"])
def test_bad_model_names_are_refused_naming_registry_models(clean_env, models):
    with pytest.raises(SettingsError) as err:
        RegistrySettings.from_env(models=models)
    assert err.value.variable == "REGISTRY_MODELS"
    assert str(err.value).startswith("REGISTRY_MODELS=")

    clean_env.setenv("REGISTRY_MODELS", models)
    with pytest.raises(SettingsError) as err:
        RegistrySettings.from_env()
    assert err.value.variable == "REGISTRY_MODELS"


def test_duplicate_model_in_a_list_is_refused(clean_env):
    with pytest.raises(SettingsError) as err:
        RegistrySettings.from_env(models=["prompt_injection", "phishing", "prompt_injection"])
    assert err.value.variable == "REGISTRY_MODELS" and "twice" in str(err.value)


def test_good_model_names_parse(clean_env):
    clean_env.setenv("REGISTRY_MODELS", " prompt_injection , phishing.v2,a-b ")
    assert RegistrySettings.from_env().models == ["prompt_injection", "phishing.v2", "a-b"]


@pytest.mark.parametrize("gate", [
    "{not json",
    '{"m": {"path": "/tmp/set.jsonl", "bogus": 1}}',
    '{"m": {"path": "/tmp/set.jsonl", "min_accuracy": 1.5}}',
    '{"m": {"min_accuracy": 0.5}}',
    '["not", "an", "object"]',
])
def test_bad_gate_is_refused_naming_registry_gate(clean_env, gate):
    clean_env.setenv("REGISTRY_GATE", gate)
    with pytest.raises(SettingsError) as err:
        RegistrySettings.from_env()
    assert err.value.variable == "REGISTRY_GATE"
    assert str(err.value).startswith("REGISTRY_GATE=")


def test_gate_parses_from_the_environment(clean_env, tmp_path):
    clean_env.setenv("REGISTRY_GATE", json.dumps({"m": {"path": str(tmp_path / "set.jsonl"), "min_accuracy": 0.9, "max_drop": 0.05}}))
    spec = RegistrySettings.from_env().gate["m"]
    assert (spec.path, spec.min_accuracy, spec.max_drop) == (tmp_path / "set.jsonl", 0.9, 0.05)


@pytest.mark.parametrize(("raw", "expected"), [("false", False), ("0", False), ("true", True)])
def test_follow_parses(clean_env, raw, expected):
    clean_env.setenv("REGISTRY_FOLLOW", raw)
    assert RegistrySettings.from_env().follow is expected


@pytest.mark.parametrize("raw", ["0", "-1"])
def test_poll_interval_must_be_positive(clean_env, raw):
    clean_env.setenv("REGISTRY_POLL_INTERVAL", raw)
    with pytest.raises(SettingsError) as err:
        RegistrySettings.from_env()
    assert err.value.variable == "REGISTRY_POLL_INTERVAL"
    clean_env.setenv("REGISTRY_POLL_INTERVAL", "0.5")
    assert RegistrySettings.from_env().poll_interval == 0.5


# ---------------------------------------------------------------------------------------------
# 2. supervised: background loops survive any error
# ---------------------------------------------------------------------------------------------

def run_supervised(step: Callable[[], None], stop: threading.Event, wait: Any = 0.001, name: str = "unit-loop") -> threading.Thread:
    thread = threading.Thread(target=supervised, args=(name, step, wait, stop), daemon=True)
    thread.start()
    return thread


def test_supervised_step_keeps_running_through_errors_and_warns_once_while_it_keeps_failing(caplog):
    failures = [ValueError("bad value")] * 3 + [OSError("disk gone")] * 3 + [CoordinationError("bus down")] * 3
    calls: list[str] = []
    stop = threading.Event()

    def step() -> None:
        n = len(calls)
        if n < len(failures):
            calls.append("fail")
            raise failures[n]
        calls.append("ok")
        if calls.count("ok") == 3:
            stop.set()

    with caplog.at_level(logging.DEBUG, logger="serving.host"):
        thread = run_supervised(step, stop)
        thread.join(timeout=10)
    assert not thread.is_alive(), "supervised did not return after stop was set"
    assert calls == ["fail"] * 9 + ["ok"] * 3

    records = [r for r in caplog.records if r.name == "serving.host" and "unit-loop" in r.getMessage()]
    # One WARNING when it starts failing (with the traceback of an unexpected error), whatever the
    # later causes say: every other attempt is DEBUG.
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert [r.getMessage().split("retrying: ")[1] for r in warnings] == ["ValueError: bad value"]
    assert [bool(r.exc_info) for r in warnings] == [True]
    debug = [r.getMessage().split("retrying: ")[1] for r in records if r.levelno == logging.DEBUG]
    assert debug == ["ValueError: bad value"] * 2 + ["OSError: disk gone"] * 3 + ["CoordinationError: bus down"] * 3
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert infos == ["[HYBRID] unit-loop recovered (was: CoordinationError: bus down)"]


def test_supervised_warns_again_when_the_same_cause_returns_after_a_recovery(caplog):
    script = ["fail", "fail", "ok", "fail", "ok"]
    calls: list[str] = []
    stop = threading.Event()

    def step() -> None:
        what = script[len(calls)] if len(calls) < len(script) else "ok"
        calls.append(what)
        if len(calls) >= len(script):
            stop.set()
        if what == "fail":
            raise RuntimeError("flaky")

    with caplog.at_level(logging.INFO, logger="serving.host"):
        thread = run_supervised(step, stop, name="again-loop")
        thread.join(timeout=10)
    assert not thread.is_alive()
    mine = [r for r in caplog.records if "again-loop" in r.getMessage()]
    assert [(r.levelname, "recovered" in r.getMessage()) for r in mine] == [
        ("WARNING", False), ("INFO", True), ("WARNING", False), ("INFO", True)]


def test_supervised_wait_is_interrupted_by_stop_and_may_be_a_callable():
    ran = threading.Event()
    asked: list[float] = []
    stop = threading.Event()

    def wait() -> float:
        asked.append(time.monotonic())
        return 3600.0  # far longer than the test: only `stop` can end the wait

    thread = run_supervised(ran.set, stop, wait=wait)
    poll_until(lambda: ran.is_set() and asked, 10, "the first step and the wait")
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive(), "a long wait was not interrupted by stop"
    assert len(asked) == 1


def test_supervised_does_not_run_the_step_once_stopped():
    stop = threading.Event()
    stop.set()
    calls: list[int] = []
    supervised("stopped-loop", lambda: calls.append(1), 0.0, stop)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# 3. Reload buses
# ---------------------------------------------------------------------------------------------

def bus_calls(bus: ReloadBus) -> dict[str, Callable[[], Any]]:
    """Every public method of a bus, called once."""

    def take_lock() -> None:
        with bus.lock(timeout=0.5):
            pass

    return {
        "announce": lambda: bus.announce("m", "1", "latest", "me"),
        "generation": bus.generation,
        "orders_after": lambda: bus.orders_after(0),
        "ack": lambda: bus.ack(1, "w", {"ok": True}),
        "acks": lambda: bus.acks(1),
        "claim": lambda: bus.claim("k", 10),
        "heartbeat": lambda: bus.heartbeat("w", {"m": "1"}),
        "live_workers": bus.live_workers,
        "serving": bus.serving,
        "lock": take_lock,
    }


@pytest.mark.parametrize("method", [
    "announce", "generation", "orders_after", "ack", "claim", "heartbeat", "lock", "acks", "live_workers", "serving",
])
def test_file_bus_on_a_directory_replaced_by_a_file_raises_coordination_error(tmp_path, method):
    directory = tmp_path / "bus"
    bus = FileReloadBus(directory)
    # the bus worked, and holds state of every kind
    bus.announce("m", "1", "latest", "me")
    bus.ack(1, "w", {"ok": True})
    bus.heartbeat("w", {"m": "1"})
    assert bus.generation() == 1 and bus.live_workers() == ["w"]

    shutil.rmtree(directory)
    directory.write_text("not a directory")  # root ignores permissions: a file in the way stops everyone

    call = bus_calls(bus)[method]
    try:
        result = call()
    except CoordinationError as exc:
        assert str(directory) in str(exc)
        return
    except OSError as exc:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"{method} raised a raw {type(exc).__name__}: {exc}")
    raise AssertionError(f"{method} answered {result!r} on a bus whose directory is a file")


def test_file_bus_unusable_directory_at_construction(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(CoordinationError):
        FileReloadBus(blocker / "bus")


@pytest.fixture
def redis_bus(redis_srv):
    bus = RedisReloadBus(f"redis://127.0.0.1:{redis_srv.port}/0", prefix=unique("test-bus"), timeout=0.5)
    yield bus
    bus.close()


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.servers)])
def any_bus(request, tmp_path):
    if request.param == "file":
        yield FileReloadBus(tmp_path / "bus")
    else:
        yield request.getfixturevalue("redis_bus")


def test_claim_is_true_once_then_false_until_ttl_passes(any_bus):
    ttl = 0.3
    first = time.monotonic()
    assert any_bus.claim("poll", ttl) is True
    assert any_bus.claim("poll", ttl) is False
    assert any_bus.claim("other-key", ttl) is True, "claims of different keys are independent"
    poll_until(lambda: any_bus.claim("poll", ttl), 10, "the claim to expire")
    # file mtimes are coarse (a jiffy): allow a few milliseconds of slack, no more
    assert time.monotonic() - first >= ttl - 0.02
    assert any_bus.claim("poll", ttl) is False, "the renewed claim is held again"


def test_concurrent_claims_have_exactly_one_winner(any_bus):
    n = 8
    barrier = threading.Barrier(n)
    results: list[bool] = []
    lock = threading.Lock()

    def contender() -> None:
        barrier.wait(timeout=10)
        won = any_bus.claim("delivery:abc", 60)
        with lock:
            results.append(won)

    threads = [threading.Thread(target=contender) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == n
    assert results.count(True) == 1


def _claim_many(directory: str, keys: int, start: Any, out: Any) -> None:
    bus = FileReloadBus(Path(directory))
    start.wait(30)
    out.put([k for k in range(keys) if bus.claim(f"race-{k}", 60)])


def test_file_bus_claims_from_many_processes_have_one_winner_per_key(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    keys, n = 1000, 8
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_many, args=(str(tmp_path / "bus"), keys, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    start.set()
    won = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = sorted(k for ks in won for k in ks)
    assert winners == list(range(keys)), "each key claimed by exactly one process"


def test_heartbeat_serving_round_trip(any_bus):
    any_bus.heartbeat("w1", serving={"m": "3"})
    any_bus.heartbeat("w2")
    assert any_bus.serving() == {"w1": {"m": "3"}, "w2": {}}
    assert any_bus.live_workers() == ["w1", "w2"]
    any_bus.heartbeat("w1", serving={"m": "4", "n": "1"})
    assert any_bus.serving()["w1"] == {"m": "4", "n": "1"}


def test_orders_and_acks_round_trip(any_bus):
    assert any_bus.generation() == 0
    a = any_bus.announce("m", "2", "latest", "w1")
    b = any_bus.announce("m", "", "", "publisher", kind="changed")
    assert (a.generation, b.generation) == (1, 2) and any_bus.generation() == 2
    assert [(o.generation, o.version, o.kind) for o in any_bus.orders_after(0)] == [(1, "2", "reload"), (2, "", "changed")]
    assert [o.generation for o in any_bus.orders_after(1)] == [2]
    any_bus.ack(1, "w1", {"ok": True, "version": "2"})
    any_bus.ack(1, "w2", {"ok": False, "error": "boom"})
    assert any_bus.acks(1) == {"w1": {"ok": True, "version": "2"}, "w2": {"ok": False, "error": "boom"}}
    assert any_bus.acks(2) == {}


@pytest.mark.servers
def test_redis_bus_reads_an_old_bare_timestamp_heartbeat(redis_bus, redis_srv):
    r = redis.Redis(port=redis_srv.port, db=0)
    r.hset(f"{redis_bus.prefix}:workers", "old-worker", str(time.time()))
    r.hset(f"{redis_bus.prefix}:workers", "dead-old-worker", str(time.time() - 3600))
    redis_bus.heartbeat("new-worker", serving={"m": "3"})
    assert redis_bus.serving() == {"new-worker": {"m": "3"}, "old-worker": {}}
    assert redis_bus.live_workers() == ["new-worker", "old-worker"]
    # a stale heartbeat is dropped from the hash
    assert r.hexists(f"{redis_bus.prefix}:workers", "dead-old-worker") == 0


def test_file_bus_reads_a_heartbeat_without_serving(tmp_path):
    bus = FileReloadBus(tmp_path / "bus")
    (tmp_path / "bus" / "worker-old.json").write_text(json.dumps({"worker": "old", "at": time.time()}))
    bus.heartbeat("new", serving={"m": "3"})
    assert bus.serving() == {"new": {"m": "3"}, "old": {}}


def test_redis_bus_unreachable_raises_coordination_error_from_every_method():
    bus = RedisReloadBus(f"redis://127.0.0.1:{free_port()}/0", prefix=unique("dead-bus"), timeout=0.2)
    try:
        for call in bus_calls(bus).values():
            with pytest.raises(CoordinationError):
                call()
    finally:
        bus.close()


# ---------------------------------------------------------------------------------------------
# 6. CircuitBreaker
# ---------------------------------------------------------------------------------------------

def test_breaker_opens_after_n_failures_and_refuses_while_open():
    breaker = CircuitBreaker(failures=3, reset_s=60)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state() == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state() == "open"
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    assert 55 < breaker.retry_in() <= 60


def test_breaker_success_resets_the_count():
    breaker = CircuitBreaker(failures=2, reset_s=60)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state() == "closed" and breaker.allow()


def open_breaker(reset_s: float) -> CircuitBreaker:
    breaker = CircuitBreaker(failures=2, reset_s=reset_s)
    breaker.record_failure()
    breaker.record_failure()
    assert not breaker.allow()
    return breaker


def test_breaker_half_opens_for_one_probe_and_closes_on_its_success():
    breaker = open_breaker(0.2)
    poll_until(lambda: breaker.state() == "half_open", 10, "half-open")
    assert breaker.allow() is True, "the probe"
    assert breaker.allow() is False, "a second caller while the probe runs"
    breaker.record_success()
    assert breaker.state() == "closed"
    assert all(breaker.allow() for _ in range(5))


def test_breaker_reopens_on_the_probes_failure():
    breaker = open_breaker(0.2)
    poll_until(lambda: breaker.state() == "half_open", 10, "half-open")
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state() == "open"
    assert breaker.allow() is False
    assert breaker.retry_in() > 0.1
    # and after another reset period, one more probe
    poll_until(lambda: breaker.state() == "half_open", 10, "half-open again")
    assert breaker.allow() is True and breaker.allow() is False


def test_breaker_concurrent_callers_in_half_open_get_one_probe():
    breaker = open_breaker(0.1)
    poll_until(lambda: breaker.state() == "half_open", 10, "half-open")
    n = 16
    barrier = threading.Barrier(n)
    results: list[bool] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait(timeout=10)
        allowed = breaker.allow()
        with lock:
            results.append(allowed)

    threads = [threading.Thread(target=caller) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == n and results.count(True) == 1


# ---------------------------------------------------------------------------------------------
# 4. Resolver finality with real MLflow (+ S3); the allow-list
# ---------------------------------------------------------------------------------------------

def mlflow_client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def cut_off_mlflow(resolver: Resolver) -> None:
    """Point this resolver's MLflow layer at a loopback port where nothing listens (MLflow unreachable)."""
    assert resolver.authority is not None
    resolver.authority.tracking_uri = dead_url()
    resolver.authority._client = None


def backup_holds(settings: RegistrySettings, name: str, selector: str) -> bool:
    return FileBackupSource(settings.backup_path).lookup(name, Selector.parse(selector)) is not None


@pytest.fixture
def two_versions(tmp_path, mlflow_srv):
    """A model of this test's own with versions 1 and 2 in MLflow; the publisher wrote both to the backup."""
    name = unique("final")
    settings = settings_for(tmp_path, mlflow_uri=mlflow_srv.url)
    for seed, f1 in ((1, 0.8), (2, 0.9)):
        publish_tiny(settings, name, seed, f1)
    assert backup_holds(settings, name, "1") and backup_holds(settings, name, "2")
    return name, settings


@pytest.mark.servers
def test_a_version_deleted_in_mlflow_is_not_answered_by_backup_or_memory(two_versions, mlflow_srv):
    name, settings = two_versions
    resolver = Resolver.from_settings(settings)
    assert resolver.resolve(name, "1").record.source == "mlflow"
    assert resolver.last_known()[f"{name}@1"]["version"] == "1", "memory has seen version 1"

    mlflow_client(mlflow_srv.url).delete_model_version(settings.registered_name(name), "1")
    assert backup_holds(settings, name, "1"), "the backup still holds the deleted version"

    with pytest.raises(ModelNotResolvable) as err:
        resolver.resolve(name, "1")
    assert outcomes(err.value) == [("mlflow", "miss"), ("file", "miss")]
    assert err.value.trail[1].detail.startswith("not asked")
    # a fresh resolver (no memory) says the same
    with pytest.raises(ModelNotResolvable) as err:
        Resolver.from_settings(settings).resolve(name, "1")
    assert outcomes(err.value) == [("mlflow", "miss"), ("file", "miss")]
    # the version left still resolves
    assert resolver.resolve(name, "2").record.version == "2"


@pytest.mark.servers
def test_mlflow_no_is_final_even_while_the_cache_layer_is_down(two_versions, mlflow_srv):
    name, settings = two_versions
    # Redis is configured but down: a registry layer failed, which alone would let memory answer
    with_dead_cache = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    resolver = Resolver.from_settings(with_dead_cache)
    res = resolver.resolve(name, "1")
    assert outcomes(res) == [("redis", "unavailable"), ("mlflow", "hit")]

    mlflow_client(mlflow_srv.url).delete_model_version(settings.registered_name(name), "1")
    with pytest.raises(ModelNotResolvable) as err:
        resolver.resolve(name, "1")
    assert outcomes(err.value) == [("redis", "unavailable"), ("mlflow", "miss"), ("file", "miss")]
    assert "memory" not in str(err.value)


@pytest.mark.servers
def test_an_alias_deleted_in_mlflow_is_not_answered_by_the_backup(tmp_path, mlflow_srv):
    name = unique("alias")
    settings = settings_for(tmp_path, mlflow_uri=mlflow_srv.url)
    publish_tiny(settings, name, 1, 0.8)
    client = mlflow_client(mlflow_srv.url)
    client.set_registered_model_alias(settings.registered_name(name), "champion", "1")
    resolver = Resolver.from_settings(settings)
    assert resolver.resolve(name, "champion").record.version == "1"  # writes the alias into the backup
    assert backup_holds(settings, name, "champion")

    client.delete_registered_model_alias(settings.registered_name(name), "champion")
    assert backup_holds(settings, name, "champion"), "the backup still names the alias"
    with pytest.raises(ModelNotResolvable) as err:
        resolver.resolve(name, "champion")
    assert outcomes(err.value) == [("mlflow", "miss"), ("file", "miss")]
    assert err.value.trail[1].detail.startswith("not asked")


@pytest.mark.servers
def test_when_mlflow_is_unreachable_backup_then_memory_still_answer(two_versions, mlflow_srv):
    name, settings = two_versions
    resolver = Resolver.from_settings(settings)
    assert resolver.resolve(name, "1").record.source == "mlflow"
    mlflow_client(mlflow_srv.url).delete_model_version(settings.registered_name(name), "1")

    # MLflow cannot be asked: no definite "no", so the backup answers
    down = settings.model_copy(update={"mlflow_tracking_uri": dead_url()})
    res = Resolver.from_settings(down).resolve(name, "1")
    assert outcomes(res) == [("mlflow", "unavailable"), ("file", "hit")] and res.record.version == "1"

    # backup gone too: the memory of the resolver that saw version 1 answers, and says it is stale
    settings.backup_path.unlink()
    cut_off_mlflow(resolver)
    res = resolver.resolve(name, "1")
    assert res.stale and res.record.version == "1"
    assert outcomes(res) == [("mlflow", "unavailable"), ("file", "miss"), ("memory", "hit")]


@pytest.mark.servers
def test_refresh_from_authority_purges_a_deleted_version_from_backup_and_memory(two_versions, mlflow_srv):
    name, settings = two_versions
    resolver = Resolver.from_settings(settings)
    resolver.resolve(name, "1")
    resolver.resolve(name, "latest")
    assert {f"{name}@1", f"{name}@latest"} <= set(resolver.last_known())

    mlflow_client(mlflow_srv.url).delete_model_version(settings.registered_name(name), "1")
    section = resolver.refresh_from_authority(name)
    assert section is not None and [r.version for r in section.versions] == ["2"]
    assert not backup_holds(settings, name, "1") and backup_holds(settings, name, "2")
    known = resolver.last_known()
    assert f"{name}@1" not in known and known[f"{name}@latest"]["version"] == "2"

    # with MLflow unreachable now, neither memory nor backup brings version 1 back
    cut_off_mlflow(resolver)
    with pytest.raises(ModelNotResolvable) as err:
        resolver.resolve(name, "1")
    assert outcomes(err.value) == [("mlflow", "unavailable"), ("file", "miss")]
    assert resolver.resolve(name, "2").record.version == "2"


ALLOWED = ["models:/", "s3://artifacts/"]


def evil_payload(name: str, version: str = "1") -> str:
    record = ModelRecord(name=name, version=version, model_uri=f"models:/security_{name}/{version}",
                         artifact_uri=f"s3://evil/{name}/{version}", source="test")
    return PayloadCodec().encode(RegistryPayload.from_sections([ModelSection.from_records(name, [record])]))


@pytest.mark.servers
def test_cache_entry_outside_the_allow_list_is_rejected_and_mlflow_answers(tmp_path, redis_srv, mlflow_srv):
    name = unique("allow")
    publish_tiny(settings_for(tmp_path / "publish", mlflow_uri=mlflow_srv.url), name, 1, 0.8)
    key = unique("allow-key")
    redis.Redis(port=redis_srv.port, db=0).set(key, evil_payload(name))
    settings = settings_for(tmp_path, redis_url=f"redis://127.0.0.1:{redis_srv.port}/0", cache_key=key,
                            mlflow_uri=mlflow_srv.url, allowed_uris=ALLOWED)
    resolver = Resolver.from_settings(settings)
    res = resolver.resolve(name, "latest")
    assert outcomes(res) == [("redis", "rejected"), ("mlflow", "hit")]
    assert "s3://evil/" in res.trail[0].detail and "REGISTRY_ALLOWED_URIS" in res.trail[0].detail
    assert res.record.artifact_uri.startswith("s3://artifacts/")
    assert resolver.breakers["redis"].state() == "closed", "a refused answer is not a failure of the layer"
    # MLflow's write-back replaced the refused entry: the cache answers next time
    assert outcomes(Resolver.from_settings(settings).resolve(name, "latest")) == [("redis", "hit")]


def test_backup_entry_outside_the_allow_list_is_rejected_and_the_fallback_answers(tmp_path):
    name = "allowfile"
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    settings = settings_for(tmp_path, allowed_uris=ALLOWED, fallback={name: str(pretrained)})
    settings.backup_path.write_text(evil_payload(name))
    resolver = Resolver.from_settings(settings)
    for _ in range(settings.breaker_failures + 1):
        res = resolver.resolve(name, "latest")
        assert outcomes(res) == [("file", "rejected"), ("huggingface", "hit")]
    assert "s3://evil/" in res.trail[0].detail
    assert res.record.source == "huggingface" and res.record.model_uri == str(pretrained)
    assert resolver.breakers["file"].state() == "closed"

    # without the allow-list the same entry is a hit: the refusal came from the list alone
    open_settings = settings.model_copy(update={"allowed_uris": []})
    assert outcomes(Resolver.from_settings(open_settings).resolve(name, "latest")) == [("file", "hit")]
