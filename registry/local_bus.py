"""The reload bus in a local directory, for a service without Redis (see `registry.coordination`).

Orders, acknowledgements, heartbeats and claims are small JSON files, replaced atomically; writers
are serialised by lock files. Every failure to read or write the directory is a CoordinationError.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from registry.coordination import (
    CoordinationError,
    RELOAD,
    ReloadBus,
    ReloadOrder,
    LOG_LENGTH,
    HEARTBEAT_TTL,
    _beat,
    _file_safe,
    worker_id,
)
from registry.files import atomic_write, locked

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def _local_io(method: Callable[..., _T]) -> Callable[..., _T]:
    """A local bus whose directory cannot be read or written raises CoordinationError, never a raw OSError."""

    @functools.wraps(method)
    def wrapper(self: "FileReloadBus", *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            raise CoordinationError(f"local reload bus {self.dir}: {type(exc).__name__}: {exc}") from exc

    return wrapper


class FileReloadBus(ReloadBus):
    """The same protocol in a local directory, for a service without Redis."""

    kind = "local"

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CoordinationError(f"reload directory {self.dir}: {exc}") from exc

    def _flock(self, name: str, timeout: float = 30.0) -> contextlib.AbstractContextManager[None]:
        return locked(self.dir / name, timeout, lambda reason: CoordinationError(f"local reload bus: {reason}"))

    def lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        return self._flock("reload.lock", timeout)

    def _require_dir(self) -> None:
        # A directory that vanished or became a file reads as "nothing there" to glob and to a
        # missing orders file: say the bus is unusable instead.
        if not self.dir.is_dir():
            raise CoordinationError(f"local reload bus {self.dir}: not a directory (removed or replaced)")

    def _read_log(self) -> dict[str, Any]:
        self._require_dir()
        try:
            data = json.loads((self.dir / "orders.json").read_text())
            return data if isinstance(data, dict) else {"generation": 0, "orders": []}
        except (FileNotFoundError, ValueError):
            return {"generation": 0, "orders": []}

    def _write_json(self, name: str, data: Any) -> None:
        atomic_write(self.dir / name, json.dumps(data), durable=False)  # the bus lives as long as the service run

    @_local_io
    def announce(self, model: str, version: str, selector: str, issued_by: str, kind: str = RELOAD) -> ReloadOrder:
        with self._flock("orders.lock"):
            data = self._read_log()
            order = ReloadOrder(int(data["generation"]) + 1, model, version, selector, issued_by, time.time(), kind)
            data["generation"] = order.generation
            data["orders"] = (data.get("orders", []) + [json.loads(order.to_json())])[-LOG_LENGTH:]
            self._write_json("orders.json", data)
        return order

    @_local_io
    def generation(self) -> int:
        return int(self._read_log().get("generation", 0))

    @_local_io
    def orders_after(self, generation: int) -> list[ReloadOrder]:
        out = []
        for raw in self._read_log().get("orders", []):
            try:
                order = ReloadOrder.from_json(json.dumps(raw))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("[HYBRID] unreadable reload order skipped: %s", exc)
                continue
            if order.generation > generation:
                out.append(order)
        return out

    @_local_io
    def ack(self, generation: int, worker: str, result: dict[str, Any]) -> None:
        self._write_json(f"ack-{generation}-{_file_safe(worker)}.json", {"worker": worker, **result})

    @_local_io
    def acks(self, generation: int) -> dict[str, dict[str, Any]]:
        self._require_dir()
        out = {}
        for path in self.dir.glob(f"ack-{generation}-*.json"):
            with contextlib.suppress(FileNotFoundError, ValueError):
                data = json.loads(path.read_text())
                out[data.pop("worker")] = data
        return out

    @_local_io
    def claim(self, key: str, ttl: float) -> bool:
        with self._flock("claims.lock"):
            path = self.dir / f"claim-{_file_safe(key)}"
            try:
                if time.time() - path.stat().st_mtime < ttl:
                    return False
            except FileNotFoundError:
                pass
            path.write_text(worker_id())
            return True

    @_local_io
    def heartbeat(self, worker: str, serving: Optional[dict[str, str]] = None, replica: Optional[str] = None,
                  loaded: Optional[list[str]] = None) -> None:
        self._write_json(f"worker-{_file_safe(worker)}.json",
                         {"worker": worker, "at": time.time(), "serving": serving or {}, "replica": replica,
                          "loaded": loaded or []})

    @_local_io
    def beats(self) -> dict[str, dict[str, Any]]:
        self._require_dir()
        now = time.time()
        live = {}
        for path in self.dir.glob("worker-*.json"):
            with contextlib.suppress(FileNotFoundError):
                beat = _beat(path.read_bytes())
                if beat is not None and beat["worker"] and now - beat["at"] <= HEARTBEAT_TTL:
                    live[str(beat["worker"])] = beat
                else:
                    path.unlink(missing_ok=True)
        return live
