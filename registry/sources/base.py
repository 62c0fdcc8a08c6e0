"""The one small interface every registry layer implements."""

from __future__ import annotations

import abc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from registry.logs import FailureLog, log_fields
from registry.payload import ModelSection, RegistryPayload
from registry.record import ModelRecord, Selector

if TYPE_CHECKING:
    from registry.settings import RegistrySettings


@dataclass(frozen=True)
class Answer:
    """A layer's hit: the record, and the model's registry data to write back to the layers above."""

    record: ModelRecord
    section: Optional[ModelSection] = None
    as_of: Optional[float] = None  # when the layer's data was written (epoch seconds), if it says


@dataclass
class LayerHealth:
    """What one layer says about itself: reachable or not, how fast, and what it holds per model."""

    source: str
    reachable: bool
    latency_ms: float
    detail: str = ""
    models: dict[str, Any] = field(default_factory=dict)
    circuit: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "circuit": self.circuit,
            "reachable": self.reachable,
            "latency_ms": round(self.latency_ms, 3),
            "detail": self.detail,
            "models": self.models,
        }


class RegistrySource(abc.ABC):
    """One layer of the chain.

    `lookup` answers in exactly one of three ways, and they must not blur:
    an `Answer` (hit); `None` ("I hold nothing for this"); or an exception —
    `SourceUnavailable` ("I could not ask") or `SourceRejected` / `PayloadError`
    ("what I hold is unusable").
    """

    source_id: str = ""
    tag: str = "[HYBRID]"
    #: Speaks for the live registry: its hit is current registry data, its failure means the
    #: registry could not be asked (Redis, the training API, MLflow).
    live_registry: bool = False
    #: Its hits are authoritative data worth copying into the cache and the backup. A file hit is
    #: not copied into Redis: promoting a disaster-recovery copy into the shared cache would hide
    #: MLflow's recovery from every replica for a whole TTL.
    write_back: bool = False
    #: The registry itself (MLflow): once it has answered, its answer is final, and a definite
    #: "no such version or alias" is never overridden by a copy below it or by memory.
    authority: bool = False
    #: Holds a copy of registry data below the authority (the file backup).
    registry_copy: bool = False
    #: A stand-in that is not registry data (the pretrained fallback): never remembered, and
    #: never preferred over a registry version that already serves.
    stand_in: bool = False

    def __init__(self) -> None:
        self.logger = logging.getLogger(type(self).__module__)
        self._failures = FailureLog(self.logger)

    @abc.abstractmethod
    def lookup(self, name: str, selector: Selector) -> Optional[Answer]:
        """Find the version of `name` the selector names."""

    @abc.abstractmethod
    def health(self, models: list[str]) -> LayerHealth:
        """Reachability, latency and what the layer holds for each model."""

    def miss_detail(self, selector: Selector) -> str:
        """Why a miss may be no news (shown in the trail); the default says nothing."""
        return ""

    def close(self) -> None:  # noqa: B027 - optional: a layer holding no connection has nothing to release
        """Release connections; the default holds none."""

    @classmethod
    def from_settings(cls, settings: "RegistrySettings") -> Optional["RegistrySource"]:
        """The layer as the settings configure it, or None when it is switched off."""
        raise NotImplementedError

    # Logging a failing layer once: the first failure is a WARNING naming the layer and the cause,
    # every later attempt (whatever its cause says: a timeout, a changed port) is DEBUG, and the
    # recovery is one INFO line.
    def note_failure(self, kind: str, cause: str, model: Optional[str] = None) -> None:
        self._failures.failed("layer", cause, "%s %s %s: %s", self.tag, self.source_id, kind, cause,
                              extra=log_fields(model, None, self.source_id))

    def note_success(self) -> None:
        self._failures.recovered("layer", "%s %s recovered", self.tag, self.source_id, extra=log_fields(None, None, self.source_id))


def section_summary(section: Optional[ModelSection]) -> dict[str, Any]:
    """What a layer holds for one model, for health answers."""
    if section is None:
        return {"present": False}
    return {
        "present": True,
        "latest": section.latest.version if section.latest else None,
        "best": section.best.version if section.best else None,
        "versions": [r.version for r in section.versions],
    }


def payload_summary(payload: Optional[RegistryPayload], models: list[str], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in models:
        if payload is None:
            out[name] = {"present": False}
            continue
        try:
            out[name] = section_summary(payload.section(name, source=source))
        except Exception as exc:  # a broken model entry is reported, not raised, by health
            out[name] = {"present": True, "error": str(exc)}
    return out


class CircuitBreaker:
    """Stop asking a layer that keeps failing: open after `failures` in a row, try again after `reset_s`.

    closed -> (failures in a row) -> open -> (reset_s passed) -> half-open: one call is let through;
    its success closes the breaker, its failure opens it again.
    """

    def __init__(self, failures: int = 3, reset_s: float = 30.0, *, name: Optional[str] = None):
        self.failures = failures
        self.reset_s = reset_s
        self.name = name  # the layer, for the `registry_circuit_open` gauge
        self._count = 0
        self._opened_at: Optional[float] = None
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if time.monotonic() - self._opened_at < self.reset_s or self._probing:
                return False
            self._probing = True  # half-open: this caller is the probe
            return True

    def record_success(self) -> None:
        with self._lock:
            was_open = self._opened_at is not None
            self._count = 0
            self._opened_at = None
            self._probing = False
        if was_open:
            self._gauge(0)

    def record_failure(self) -> None:
        with self._lock:
            self._count += 1
            self._probing = False
            opened = self._count >= self.failures
            if opened:
                self._opened_at = time.monotonic()
        if opened:
            self._gauge(1)

    def _gauge(self, value: int) -> None:
        if self.name is not None:
            from registry.metrics import metrics

            metrics().circuit_open.labels(self.name).set(value)

    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half_open" if time.monotonic() - self._opened_at >= self.reset_s else "open"

    def retry_in(self) -> float:
        with self._lock:
            return 0.0 if self._opened_at is None else max(0.0, self.reset_s - (time.monotonic() - self._opened_at))

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state(), "consecutive_failures": self._count, "retry_in_s": round(self.retry_in(), 1)}
