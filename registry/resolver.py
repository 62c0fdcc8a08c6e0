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
from typing import Any, Collection, Optional, Sequence

from registry.allowlist import AllowList
from registry.errors import ArtifactError, ModelNotResolvable, PayloadError, SourceRejected, SourceUnavailable
from registry.logs import log_fields
from registry.metrics import observe_trail
from registry.payload import ModelSection
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

#: The chain, top to bottom. Each factory returns None when its layer is switched off. What each
#: layer is (live registry, authority, copy, stand-in) is said by its class attributes.
CHAIN = (RedisCacheSource, TrainingAPISource, MLflowRegistrySource, FileBackupSource, HuggingFaceFallbackSource)

#: The in-process layer's id in trails: exact versions already seen, and the last known record.
MEMORY = "memory"


class Resolver:
    """Walks the chain for a model and selector; returns the record and every layer's outcome.

    Behind the chain, an in-process memory keeps the last record each selector resolved to from a
    registry layer, and every exact version seen: when the registry layers cannot be asked and only
    the backup or the fallback would answer, the last known record is served instead
    (stale-while-revalidate) and the resolution says so. Once MLflow has answered, its answer is
    final: a definite "no such version or alias" is never overridden by the backup or the memory.

    A hit whose record names a location outside `REGISTRY_ALLOWED_URIS` is that layer's
    `rejected` answer, and the next layer is asked.

    `read_only`: resolve without writing anything back (the operator's `registry resolve` looks,
    it does not touch the cache or the backup).
    """

    def __init__(self, sources: Sequence[RegistrySource], *, breaker_failures: int = 3, breaker_reset_s: float = 30.0,
                 allow: Optional[AllowList] = None, read_only: bool = False):
        self.sources = list(sources)
        self.read_only = read_only
        self.allow = allow or AllowList([])
        self.authority: Optional[MLflowRegistrySource] = next((s for s in self.sources if isinstance(s, MLflowRegistrySource)), None)
        self.cache: Optional[RedisCacheSource] = next((s for s in self.sources if isinstance(s, RedisCacheSource)), None)
        self.backup: Optional[FileBackupSource] = next((s for s in self.sources if isinstance(s, FileBackupSource)), None)
        self.breakers = {s.source_id: CircuitBreaker(breaker_failures, breaker_reset_s, name=s.source_id) for s in self.sources}
        self._versions: dict[tuple[str, str], tuple[ModelRecord, float]] = {}
        self._last_good: dict[tuple[str, str], Resolution] = {}
        self._memory_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: RegistrySettings, *, read_only: bool = False) -> "Resolver":
        sources = [source for factory in CHAIN if (source := factory.from_settings(settings)) is not None]
        return cls(sources, breaker_failures=settings.breaker_failures, breaker_reset_s=settings.breaker_reset,
                   allow=AllowList.from_settings(settings), read_only=read_only)

    def resolve(self, name: str, selector: Selector | str = "latest", *,
                exclude: Collection[tuple[str, Optional[str]]] = ()) -> Resolution:
        """Ask each layer in order; the first acceptable hit wins.

        Args:
            exclude: (version, sha256) pairs already tried and not loadable; such hits are passed
                over, so the next start-up candidate comes from the layers below.

        Raises:
            ModelNotResolvable: no layer had an answer; the error lists every layer's outcome.
        """
        try:
            resolution = self._resolve(name, Selector.parse(selector), exclude)
        except ModelNotResolvable as exc:
            observe_trail(name, exc.trail)
            raise
        observe_trail(name, resolution.trail)
        return resolution

    def _resolve(self, name: str, selector: Selector, exclude: Collection[tuple[str, Optional[str]]]) -> Resolution:
        trail: list[LayerAttempt] = []
        authority_said_no = False
        for source in self.sources:
            start = time.perf_counter()
            if authority_said_no and source.registry_copy:
                trail.append(LayerAttempt(source.source_id, Outcome.MISS, 0.0, "not asked: MLflow has no such version or alias"))
                continue
            breaker = self.breakers[source.source_id]
            if not breaker.allow():
                trail.append(LayerAttempt(source.source_id, Outcome.UNAVAILABLE, 0.0,
                                          f"circuit open, retry in {breaker.retry_in():.0f}s"))
                continue
            answer: Optional[Answer] = None
            try:
                answer = source.lookup(name, selector)
                if answer is not None:
                    try:
                        self.allow.check(answer.record, fallback=source.stand_in)
                    except ArtifactError as exc:
                        raise SourceRejected(source.source_id, str(exc)) from exc
            except SourceUnavailable as exc:
                breaker.record_failure()
                source.note_failure("unavailable", exc.reason, model=name)
                trail.append(LayerAttempt(source.source_id, Outcome.UNAVAILABLE, _ms(start), exc.reason))
                continue
            except (PayloadError, SourceRejected) as exc:
                breaker.record_success()  # it answered; what it holds is the problem
                source.logger.warning("%s %s rejected for model %r: %s", source.tag, source.source_id, name, exc,
                                      extra=log_fields(name, None, source.source_id))
                trail.append(LayerAttempt(source.source_id, Outcome.REJECTED, _ms(start), str(exc)))
                continue
            breaker.record_success()
            source.note_success()
            if answer is None:
                authority_said_no = authority_said_no or source.authority
                trail.append(LayerAttempt(source.source_id, Outcome.MISS, _ms(start), source.miss_detail(selector)))
                continue
            if (answer.record.version, answer.record.sha256) in exclude:
                trail.append(LayerAttempt(source.source_id, Outcome.REJECTED, _ms(start),
                                          f"version {answer.record.version} already tried"))
                continue
            trail.append(LayerAttempt(source.source_id, Outcome.HIT, _ms(start), f"version {answer.record.version}"))
            if not authority_said_no:
                stale = self._stale_instead(name, selector, answer, trail, exclude)
                if stale is not None:
                    return stale
            resolution = Resolution(answer.record, tuple(trail), selector, answer.as_of or time.time())
            self._remember(resolution, source)
            if source.write_back and not self.read_only:
                self._write_back(answer)
            logger.info(
                "[HYBRID] %s@%s -> version %s from %s (%s)",
                name, selector, answer.record.version, source.source_id,
                ", ".join(f"{a.source}={a.outcome}" for a in trail), extra=log_fields(name, answer.record.version, source.source_id),
            )
            return resolution
        stale = None if authority_said_no else self._stale_instead(name, selector, None, trail, exclude)
        if stale is not None:
            return stale
        error = ModelNotResolvable(name, selector.value, trail)
        # The caller says it once: the model loader as a WARNING when it starts failing, /reload in
        # its answer, the registry command on stderr. Each layer's failure was logged once already.
        logger.debug("[HYBRID] %s", error, extra=log_fields(name))
        raise error

    def fallback(self, name: str) -> Resolution:
        """The pretrained stand-in alone (the last start-up candidate).

        Raises:
            ModelNotResolvable: no usable fallback is configured for the model.
        """
        trail: list[LayerAttempt] = []
        selector = Selector.parse("latest")
        for source in (s for s in self.sources if s.stand_in):
            answer = source.lookup(name, selector)
            if answer is None:
                trail.append(LayerAttempt(source.source_id, Outcome.MISS, 0.0))
                continue
            try:
                self.allow.check(answer.record, fallback=True)
            except ArtifactError as exc:
                trail.append(LayerAttempt(source.source_id, Outcome.REJECTED, 0.0, str(exc)))
                continue
            trail.append(LayerAttempt(source.source_id, Outcome.HIT, 0.0, f"version {answer.record.version}"))
            return Resolution(answer.record, tuple(trail), selector, time.time())
        raise ModelNotResolvable(name, selector.value, trail)

    def _remember(self, resolution: Resolution, source: RegistrySource) -> None:
        record = resolution.record
        if source.stand_in:
            return
        with self._memory_lock:
            self._versions[(record.name, record.version)] = (record, resolution.fetched_at)
            if source.live_registry:
                self._last_good[(record.name, resolution.selector.value)] = resolution

    def forget(self, name: str, keep_versions: Collection[str]) -> list[str]:
        """Drop what memory holds of the model's versions outside `keep_versions` (deleted in the registry)."""
        with self._memory_lock:
            gone = sorted({v for (n, v) in self._versions if n == name and v not in keep_versions})
            for version in gone:
                self._versions.pop((name, version), None)
            for key, resolution in list(self._last_good.items()):
                if key[0] == name and resolution.record.version not in keep_versions:
                    self._last_good.pop(key, None)
        return gone

    def _stale_instead(self, name: str, selector: Selector, answer: Optional[Answer], trail: list[LayerAttempt],
                       exclude: Collection[tuple[str, Optional[str]]] = ()) -> Optional[Resolution]:
        """The last known registry record, when the registry could not be asked and only a worse layer answered."""
        if answer is not None and self._source(answer.record.source).live_registry:
            return None
        live = {s.source_id for s in self.sources if s.live_registry}
        registry_failed = any(a.source in live and a.outcome in (Outcome.UNAVAILABLE, Outcome.REJECTED) for a in trail)
        with self._memory_lock:
            last = self._last_good.get((name, selector.value))
            if last is None and selector.kind == "version" and (name, selector.value) in self._versions:
                record, fetched_at = self._versions[(name, selector.value)]
                last = Resolution(record, (), selector, fetched_at)
        if not registry_failed or last is None or (last.record.version, last.record.sha256) in exclude:
            return None
        if answer is not None and self._source(answer.record.source).registry_copy and (answer.as_of or 0) >= last.fetched_at:
            return None  # the backup is at least as recent as what this process last saw
        age = time.time() - last.fetched_at
        worse = f"{answer.record.source} would answer version {answer.record.version}" if answer else "no layer answered"
        attempt = LayerAttempt(MEMORY, Outcome.HIT, 0.0, f"stale: version {last.record.version} last answered by "
                                                         f"{last.record.source} {age:.0f}s ago; {worse}")
        logger.warning("[HYBRID] %s@%s: registry unavailable, serving the last known version %s (%.0fs old) rather than %s",
                       name, selector, last.record.version, age, worse)
        return Resolution(last.record, (*trail, attempt), selector, last.fetched_at, stale=True)

    def is_stand_in(self, record: ModelRecord) -> bool:
        """Whether the record came from the pretrained fallback rather than the registry."""
        return self._source(record.source).stand_in

    def _source(self, source_id: str) -> RegistrySource:
        return next((s for s in self.sources if s.source_id == source_id), _NO_SOURCE)

    def _write_back(self, answer: Answer) -> None:
        section = answer.section
        if section is not None:
            write_all((self.cache, self.backup), lambda target: target.store_section(section), "write-back failed")

    def refresh_from_authority(self, name: str) -> Optional[ModelSection]:
        """Read the model from MLflow and make the cache, the backup and memory say the same.

        Versions MLflow no longer holds are purged from all three. Returns MLflow's section (None
        when the model has no version there).

        Raises:
            SourceUnavailable: MLflow could not be asked (or is not configured).
        """
        if self.authority is None:
            raise SourceUnavailable("mlflow", "MLFLOW_TRACKING_URI is not set: there is no registry to follow")
        if self.read_only:
            raise RuntimeError("a read-only resolver writes nothing: refresh_from_authority needs a writing one")
        section = self.authority.section(name)
        replacement = section or ModelSection(name=name)
        for target in (self.cache, self.backup):
            if target is None:
                continue
            try:
                held = target.load_payload()
                current = held.section(name, source=target.source_id) if held is not None else None
            except (SourceUnavailable, PayloadError):
                current = None
            if current is None and section is None:
                continue
            if current is None or current.entries() != replacement.entries():
                write_all((target,), lambda t: t.store_section(replacement, replace=True), "refresh from MLflow failed")
                target.logger.info("%s %s refreshed for %s from MLflow (versions %s)", target.tag, target.source_id, name,
                                   [r.version for r in replacement.versions])
        gone = self.forget(name, {r.version for r in replacement.all_records()})
        if gone:
            logger.info("[HYBRID] forgot %s versions %s: no longer in MLflow", name, gone)
        return section

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


class _NoSource(RegistrySource):
    """Stands for a layer this resolver does not have (a record from memory)."""

    def lookup(self, name: str, selector: Selector) -> Optional[Answer]:
        return None

    def health(self, models: list[str]) -> LayerHealth:
        return LayerHealth("", False, 0.0)


_NO_SOURCE = _NoSource()


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
