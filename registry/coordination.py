"""Reload coordination: every worker of a service, and every replica sharing a Redis, ends on the same version.

One mechanism, two backends. A reload is an *order* (model + concrete version) appended to a short
log under a generation number that only grows. Each worker polls the generation (a Redis `GET`, or
a file read), applies the orders it has not seen, and acknowledges each one. The worker that took
the HTTP request resolves the version once, loads it itself, announces it, and waits for the
acknowledgements of the workers it knows are alive (each worker heartbeats).

- With `REGISTRY_REDIS_URL`: keys under `<cache_key>:reload:*` (shared by all replicas).
- Without: a directory (`registry.local_bus`), private to this service run (keyed by the parent
  process, the BentoML arbiter) unless `REGISTRY_RELOAD_DIR` names one.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import redis
from redis.exceptions import LockError

from registry.errors import RegistryError
from registry.settings import RegistrySettings

logger = logging.getLogger(__name__)

LOG_LENGTH = 100
LOCK_TTL = 15.0
HEARTBEAT_TTL = 6.0


class CoordinationError(RegistryError):
    """The reload bus (Redis or the local directory) could not be used."""

    status = 503


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def replica_id() -> str:
    """The BentoML service run this worker belongs to: its workers share the parent (the arbiter)."""
    return f"{socket.gethostname()}:{os.getppid()}"


#: An order's kinds: load this exact version; or the registry changed, look again.
RELOAD = "reload"
CHANGED = "changed"


@dataclass(frozen=True)
class ReloadOrder:
    """Load `version` of `model`: what every worker must end on (kind `reload`).

    Kind `changed`: the registry changed for `model` (a publisher or an operator said so); one
    worker that follows the registry claims it and rolls out what the configured selector now names.
    """

    generation: int
    model: str
    version: str
    selector: str
    issued_by: str
    issued_at: float
    kind: str = RELOAD

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> "ReloadOrder":
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data or k != "kind"})


class ReloadBus(abc.ABC):
    """Where reload orders, acknowledgements and worker heartbeats meet."""

    kind = ""

    @abc.abstractmethod
    def lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Serialise reloads across workers (and replicas)."""

    @abc.abstractmethod
    def announce(self, model: str, version: str, selector: str, issued_by: str, kind: str = RELOAD) -> ReloadOrder:
        """Append an order under the next generation."""

    @abc.abstractmethod
    def claim(self, key: str, ttl: float) -> bool:
        """True for exactly one caller per `key` until `ttl` seconds pass (a poll slot, a delivery id)."""

    @abc.abstractmethod
    def generation(self) -> int:
        """The newest generation (0 before any reload)."""

    @abc.abstractmethod
    def orders_after(self, generation: int) -> list[ReloadOrder]:
        """Orders newer than `generation`, oldest first."""

    @abc.abstractmethod
    def ack(self, generation: int, worker: str, result: dict[str, Any]) -> None:
        """Record one worker's outcome for an order."""

    @abc.abstractmethod
    def acks(self, generation: int) -> dict[str, dict[str, Any]]:
        """Every outcome recorded for an order, by worker."""

    @abc.abstractmethod
    def heartbeat(self, worker: str, serving: Optional[dict[str, str]] = None, replica: Optional[str] = None,
                  loaded: Optional[list[str]] = None) -> None:
        """Say this worker is alive, which registry version of each model it serves, which replica it
        belongs to, and which models it has loaded (the pretrained fallback included)."""

    @abc.abstractmethod
    def beats(self) -> dict[str, dict[str, Any]]:
        """Heartbeats younger than HEARTBEAT_TTL, by worker: {"at", "serving"}."""

    def live_workers(self) -> list[str]:
        """Workers that heartbeated within HEARTBEAT_TTL."""
        return sorted(self.beats())

    def serving(self) -> dict[str, dict[str, str]]:
        """What each live worker (of every replica on this bus) serves: worker -> model -> version."""
        return {worker: dict(beat.get("serving") or {}) for worker, beat in sorted(self.beats().items())}

    def close(self) -> None:  # noqa: B027 - optional: a bus holding no connection has nothing to release
        """Release connections."""

    def wait_for_acks(self, generation: int, timeout: float, poll: float = 0.1) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Wait until every live worker has acknowledged, or the timeout passes."""
        deadline = time.monotonic() + timeout
        while True:
            acks = self.acks(generation)
            live = self.live_workers()
            missing = [w for w in live if w not in acks]
            if not missing or time.monotonic() >= deadline:
                return acks, missing
            time.sleep(poll)

    @staticmethod
    def from_settings(settings: RegistrySettings) -> "ReloadBus":
        if settings.redis_url:
            return RedisReloadBus(settings.redis_url, prefix=f"{settings.cache_key}:reload", timeout=settings.redis_timeout)
        return FileReloadBus(settings.reload_dir or default_reload_dir())


def default_reload_dir() -> Path:
    """A directory shared by the workers of one service run: they have the same parent (the arbiter)."""
    return Path(tempfile.gettempdir()) / f"registry-reload-{os.getuid()}-{os.getppid()}"


class RedisReloadBus(ReloadBus):
    """Orders in a capped Redis list; generation by INCR; heartbeats in a hash."""

    kind = "redis"

    def __init__(self, url: str, *, prefix: str, timeout: float):
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        from registry.redis_client import redis_from_url

        self.prefix = prefix
        # A plain server or a Sentinel-managed master (registry.redis_client); SettingsError for a bad URL.
        self.client = redis_from_url(url, timeout=max(timeout, 1.0), retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2))

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise CoordinationError(f"reload bus on Redis: {type(exc).__name__}: {exc}") from exc

    @contextlib.contextmanager
    def lock(self, timeout: float) -> Iterator[None]:
        # A short TTL, renewed while the reload runs: a lock whose SET reached a paused Redis after
        # the client gave up (a phantom holder) expires by itself within LOCK_TTL seconds.
        # thread_local=False: the renewer thread must see the token the reloading thread took.
        lock = self.client.lock(f"{self.prefix}:lock", timeout=LOCK_TTL, blocking_timeout=max(timeout, LOCK_TTL + 5),
                                thread_local=False)
        if not self._call(lock.acquire):
            raise CoordinationError(f"another reload held the lock for more than {max(timeout, LOCK_TTL + 5):.0f}s")
        done = threading.Event()

        def renew() -> None:
            while not done.wait(LOCK_TTL / 3):
                with contextlib.suppress(redis.RedisError, LockError):
                    lock.reacquire()

        renewer = threading.Thread(target=renew, name="reload-lock-renewer", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            with contextlib.suppress(redis.RedisError, LockError):
                lock.release()

    def announce(self, model: str, version: str, selector: str, issued_by: str, kind: str = RELOAD) -> ReloadOrder:
        generation = int(self._call(self.client.incr, f"{self.prefix}:generation"))
        order = ReloadOrder(generation, model, version, selector, issued_by, time.time(), kind)
        pipe = self.client.pipeline()
        pipe.rpush(f"{self.prefix}:log", order.to_json())
        pipe.ltrim(f"{self.prefix}:log", -LOG_LENGTH, -1)
        self._call(pipe.execute)
        return order

    def generation(self) -> int:
        return int(self._call(self.client.get, f"{self.prefix}:generation") or 0)

    def orders_after(self, generation: int) -> list[ReloadOrder]:
        orders = []
        for raw in self._call(self.client.lrange, f"{self.prefix}:log", 0, -1):
            try:
                order = ReloadOrder.from_json(raw)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("[HYBRID] unreadable reload order skipped: %s", exc)
                continue
            if order.generation > generation:
                orders.append(order)
        return sorted(orders, key=lambda o: o.generation)

    def ack(self, generation: int, worker: str, result: dict[str, Any]) -> None:
        key = f"{self.prefix}:acks:{generation}"
        pipe = self.client.pipeline()
        pipe.hset(key, worker, json.dumps(result))
        pipe.expire(key, 3600)
        self._call(pipe.execute)

    def acks(self, generation: int) -> dict[str, dict[str, Any]]:
        raw = self._call(self.client.hgetall, f"{self.prefix}:acks:{generation}")
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def claim(self, key: str, ttl: float) -> bool:
        return bool(self._call(self.client.set, f"{self.prefix}:claim:{key}", worker_id(), nx=True, px=max(1, int(ttl * 1000))))

    def heartbeat(self, worker: str, serving: Optional[dict[str, str]] = None, replica: Optional[str] = None,
                  loaded: Optional[list[str]] = None) -> None:
        self._call(self.client.hset, f"{self.prefix}:workers", worker,
                   json.dumps({"at": time.time(), "serving": serving or {}, "replica": replica, "loaded": loaded or []}))

    def beats(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        raw = self._call(self.client.hgetall, f"{self.prefix}:workers")
        live, dead = {}, []
        for k, v in raw.items():
            beat = _beat(v)
            if beat is not None and now - beat["at"] <= HEARTBEAT_TTL:
                live[k.decode()] = beat
            else:
                dead.append(k.decode())
        if dead:
            with contextlib.suppress(redis.RedisError):
                self.client.hdel(f"{self.prefix}:workers", *dead)
        return live

    def close(self) -> None:
        self.client.close()


def _beat(raw: bytes | str) -> Optional[dict[str, Any]]:
    """A heartbeat, as both buses store it: JSON {"at", "serving", "replica", "loaded"} (the local
    bus adds "worker"), or a bare timestamp (older workers). None when unreadable."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        data = {"at": data}
    if not (isinstance(data, dict) and isinstance(data.get("at"), (int, float))):
        return None
    serving, loaded = data.get("serving"), data.get("loaded")
    return {"at": float(data["at"]), "serving": serving if isinstance(serving, dict) else {}, "replica": data.get("replica"),
            "loaded": loaded if isinstance(loaded, list) else [], "worker": data.get("worker")}


def _file_safe(worker: str) -> str:
    return worker.replace("/", "_").replace(":", "_")


from registry.local_bus import FileReloadBus  # noqa: E402 - the local backend builds on the classes above
