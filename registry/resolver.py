"""The resolver: the only place the order of the chain is written.

    Redis cache -> training API -> MLflow Model Registry -> file backup -> Hugging Face fallback

A record found below the cache is written back to the cache and the file backup, with the model's
whole section of the registry, so the next resolution (here or in another replica) stops higher.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from registry.errors import ModelNotResolvable, PayloadError, SourceRejected, SourceUnavailable
from registry.record import LayerAttempt, Outcome, Resolution, Selector
from registry.settings import RegistrySettings
from registry.sources.base import Answer, LayerHealth, RegistrySource
from registry.sources.file_backup import FileBackupSource
from registry.sources.huggingface import HuggingFaceFallbackSource
from registry.sources.mlflow_registry import MLflowRegistrySource
from registry.sources.redis_cache import RedisCacheSource
from registry.sources.training_api import TrainingAPISource

logger = logging.getLogger(__name__)

#: The chain, top to bottom. Each factory returns None when its layer is switched off.
CHAIN = (RedisCacheSource, TrainingAPISource, MLflowRegistrySource, FileBackupSource, HuggingFaceFallbackSource)

#: Layers whose answers are authoritative registry data worth copying into the cache and backup.
#: A file hit is not copied into Redis: promoting a disaster-recovery copy into the shared cache
#: would hide MLflow's recovery from every replica for a whole TTL.
WRITE_BACK_FROM = frozenset({"training_api", "mlflow"})


class Resolver:
    """Walks the chain for a model and selector; returns the record and every layer's outcome."""

    def __init__(self, sources: Sequence[RegistrySource]):
        self.sources = list(sources)
        self.cache: Optional[RedisCacheSource] = next((s for s in self.sources if isinstance(s, RedisCacheSource)), None)
        self.backup: Optional[FileBackupSource] = next((s for s in self.sources if isinstance(s, FileBackupSource)), None)

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> "Resolver":
        sources = [source for factory in CHAIN if (source := factory.from_settings(settings)) is not None]
        return cls(sources)

    def resolve(self, name: str, selector: Selector | str = "latest") -> Resolution:
        """Ask each layer in order; the first hit wins.

        Raises:
            ModelNotResolvable: no layer had an answer; the error lists every layer's outcome.
        """
        selector = Selector.parse(selector)
        trail: list[LayerAttempt] = []
        for source in self.sources:
            start = time.perf_counter()
            answer: Optional[Answer] = None
            try:
                answer = source.lookup(name, selector)
            except SourceUnavailable as exc:
                source.note_failure("unavailable", exc.reason)
                trail.append(LayerAttempt(source.source_id, Outcome.UNAVAILABLE, _ms(start), exc.reason))
                continue
            except (PayloadError, SourceRejected) as exc:
                source.logger.warning("%s %s rejected for model %r: %s", source.tag, source.source_id, name, exc)
                trail.append(LayerAttempt(source.source_id, Outcome.REJECTED, _ms(start), str(exc)))
                continue
            source.note_success()
            if answer is None:
                detail = "" if selector.kind != "alias" or source.source_id not in ("redis", "training_api") or selector.value == "best" \
                    else "custom aliases are answered by MLflow"
                trail.append(LayerAttempt(source.source_id, Outcome.MISS, _ms(start), detail))
                continue
            trail.append(LayerAttempt(source.source_id, Outcome.HIT, _ms(start), f"version {answer.record.version}"))
            self._write_back(answer)
            logger.info(
                "[HYBRID] %s@%s -> version %s from %s (%s)",
                name, selector, answer.record.version, source.source_id,
                ", ".join(f"{a.source}={a.outcome}" for a in trail),
            )
            return Resolution(answer.record, tuple(trail), selector)
        error = ModelNotResolvable(name, selector.value, trail)
        logger.error("[HYBRID] %s", error)
        raise error

    def _write_back(self, answer: Answer) -> None:
        if answer.section is None or answer.record.source not in WRITE_BACK_FROM:
            return
        for target in (self.cache, self.backup):
            if target is None:
                continue
            try:
                target.store_section(answer.section)
            except SourceUnavailable as exc:
                target.note_failure("write-back failed", exc.reason)

    def health(self, models: Sequence[str]) -> list[LayerHealth]:
        """Every layer's health, asked in parallel so one slow layer does not add to the others."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.sources))) as pool:
            return list(pool.map(lambda s: s.health(list(models)), self.sources))

    def close(self) -> None:
        for source in self.sources:
            source.close()


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
