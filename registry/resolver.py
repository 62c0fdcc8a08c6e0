"""The resolver: the only place the order of the chain is written.

    Redis cache -> training API -> MLflow Model Registry -> file backup -> Hugging Face fallback

An in-process memory sits in front (exact versions) and behind (the last known record) of the
chain. A record found below the cache is written back to the cache and the file backup, with the model's
whole section of the registry, so the next resolution (here or in another replica) stops higher.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from registry.errors import ModelNotResolvable, PayloadError, SourceRejected, SourceUnavailable
from registry.record import LayerAttempt, ModelRecord, Outcome, Resolution, Selector
from registry.settings import RegistrySettings
from registry.sources.base import Answer, CircuitBreaker, LayerHealth, RegistrySource
from registry.sources.file_backup import FileBackupSource
from registry.sources.huggingface import HuggingFaceFallbackSource
from registry.sources.mlflow_registry import MLflowRegistrySource
from registry.sources.payload_source import write_all
from registry.sources.redis_cache import RedisCacheSource
from registry.sources.training_api import TrainingAPISource

logger = logging.getLogger(__name__)

#: The chain, top to bottom. Each factory returns None when its layer is switched off.
CHAIN = (RedisCacheSource, TrainingAPISource, MLflowRegistrySource, FileBackupSource, HuggingFaceFallbackSource)

#: Layers whose answers are authoritative registry data worth copying into the cache and backup.
#: A file hit is not copied into Redis: promoting a disaster-recovery copy into the shared cache
#: would hide MLflow's recovery from every replica for a whole TTL.
WRITE_BACK_FROM = frozenset({"training_api", "mlflow"})

#: Layers that speak for the live registry; below them sit the backup and the pretrained fallback.
REGISTRY_LAYERS = ("redis", "training_api", "mlflow")

#: The in-process layer's id in trails: exact versions already seen, and the last known record.
MEMORY = "memory"


class Resolver:
    """Walks the chain for a model and selector; returns the record and every layer's outcome.

    In front of the chain, an in-process memory answers exact versions it has already seen (a
    registered version never changes what it points to). Behind the chain, the same memory keeps
    the last record each selector resolved to from a registry layer: when the registry layers
    cannot be asked and only the backup or the fallback would answer, the last known record is
    served instead (stale-while-revalidate) and the resolution says so.
    """

    def __init__(self, sources: Sequence[RegistrySource], *, breaker_failures: int = 3, breaker_reset_s: float = 30.0):
        self.sources = list(sources)
        self.cache: Optional[RedisCacheSource] = next((s for s in self.sources if isinstance(s, RedisCacheSource)), None)
        self.backup: Optional[FileBackupSource] = next((s for s in self.sources if isinstance(s, FileBackupSource)), None)
        self.breakers = {s.source_id: CircuitBreaker(breaker_failures, breaker_reset_s) for s in self.sources}
        self._versions: dict[tuple[str, str], tuple[ModelRecord, float]] = {}
        self._last_good: dict[tuple[str, str], Resolution] = {}
        self._memory_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> "Resolver":
        sources = [source for factory in CHAIN if (source := factory.from_settings(settings)) is not None]
        return cls(sources, breaker_failures=settings.breaker_failures, breaker_reset_s=settings.breaker_reset)

    def resolve(self, name: str, selector: Selector | str = "latest") -> Resolution:
        """Ask each layer in order; the first hit wins.

        Raises:
            ModelNotResolvable: no layer had an answer; the error lists every layer's outcome.
        """
        selector = Selector.parse(selector)
        if selector.kind == "version":
            remembered = self._versions.get((name, selector.value))
            if remembered is not None:
                record, fetched_at = remembered
                attempt = LayerAttempt(MEMORY, Outcome.HIT, 0.0, f"version {record.version}, seen from {record.source}")
                return Resolution(record, (attempt,), selector, fetched_at)
        trail: list[LayerAttempt] = []
        for source in self.sources:
            start = time.perf_counter()
            breaker = self.breakers[source.source_id]
            if not breaker.allow():
                trail.append(LayerAttempt(source.source_id, Outcome.UNAVAILABLE, 0.0,
                                          f"circuit open, retry in {breaker.retry_in():.0f}s"))
                continue
            answer: Optional[Answer] = None
            try:
                answer = source.lookup(name, selector)
            except SourceUnavailable as exc:
                breaker.record_failure()
                source.note_failure("unavailable", exc.reason)
                trail.append(LayerAttempt(source.source_id, Outcome.UNAVAILABLE, _ms(start), exc.reason))
                continue
            except (PayloadError, SourceRejected) as exc:
                breaker.record_success()  # it answered; what it holds is the problem
                source.logger.warning("%s %s rejected for model %r: %s", source.tag, source.source_id, name, exc)
                trail.append(LayerAttempt(source.source_id, Outcome.REJECTED, _ms(start), str(exc)))
                continue
            breaker.record_success()
            source.note_success()
            if answer is None:
                trail.append(LayerAttempt(source.source_id, Outcome.MISS, _ms(start), source.miss_detail(selector)))
                continue
            trail.append(LayerAttempt(source.source_id, Outcome.HIT, _ms(start), f"version {answer.record.version}"))
            stale = self._stale_instead(name, selector, answer, trail)
            if stale is not None:
                return stale
            resolution = Resolution(answer.record, tuple(trail), selector, answer.as_of or time.time())
            self._remember(resolution)
            self._write_back(answer)
            logger.info(
                "[HYBRID] %s@%s -> version %s from %s (%s)",
                name, selector, answer.record.version, source.source_id,
                ", ".join(f"{a.source}={a.outcome}" for a in trail),
            )
            return resolution
        stale = self._stale_instead(name, selector, None, trail)
        if stale is not None:
            return stale
        error = ModelNotResolvable(name, selector.value, trail)
        logger.error("[HYBRID] %s", error)
        raise error

    def _remember(self, resolution: Resolution) -> None:
        record = resolution.record
        if record.source == "huggingface":
            return
        with self._memory_lock:
            self._versions[(record.name, record.version)] = (record, resolution.fetched_at)
            if record.source in REGISTRY_LAYERS:
                self._last_good[(record.name, resolution.selector.value)] = resolution

    def _stale_instead(self, name: str, selector: Selector, answer: Optional[Answer],
                       trail: list[LayerAttempt]) -> Optional[Resolution]:
        """The last known registry record, when the registry could not be asked and only a worse layer answered."""
        if answer is not None and answer.record.source in REGISTRY_LAYERS:
            return None
        registry_failed = any(a.source in REGISTRY_LAYERS and a.outcome in (Outcome.UNAVAILABLE, Outcome.REJECTED) for a in trail)
        last = self._last_good.get((name, selector.value))
        if not registry_failed or last is None:
            return None
        if answer is not None and answer.record.source == "file" and (answer.as_of or 0) >= last.fetched_at:
            return None  # the backup is at least as recent as what this process last saw
        age = time.time() - last.fetched_at
        worse = f"{answer.record.source} would answer version {answer.record.version}" if answer else "no layer answered"
        attempt = LayerAttempt(MEMORY, Outcome.HIT, 0.0, f"stale: version {last.record.version} last answered by "
                                                         f"{last.record.source} {age:.0f}s ago; {worse}")
        logger.warning("[HYBRID] %s@%s: registry unavailable, serving the last known version %s (%.0fs old) rather than %s",
                       name, selector, last.record.version, age, worse)
        return Resolution(last.record, (*trail, attempt), selector, last.fetched_at, stale=True)

    def _write_back(self, answer: Answer) -> None:
        section = answer.section
        if section is None or answer.record.source not in WRITE_BACK_FROM:
            return
        write_all((self.cache, self.backup), lambda target: target.store_section(section), "write-back failed")

    def health(self, models: Sequence[str]) -> list[LayerHealth]:
        """Every layer's health, asked in parallel so one slow layer does not add to the others."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.sources))) as pool:
            layers = list(pool.map(lambda s: s.health(list(models)), self.sources))
        for layer in layers:
            layer.circuit = self.breakers[layer.source].to_dict()
        return layers

    def last_known(self) -> dict[str, dict[str, Any]]:
        """What the in-process memory holds per model and selector, with its age."""
        now = time.time()
        with self._memory_lock:
            return {f"{name}@{sel}": {"version": r.record.version, "source": r.record.source, **r.freshness(now)}
                    for (name, sel), r in self._last_good.items()}

    def close(self) -> None:
        for source in self.sources:
            source.close()


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
