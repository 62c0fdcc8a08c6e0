"""Redis cache layer: the registry payload under one key, written with a TTL."""

from __future__ import annotations

from typing import Optional

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from registry.errors import PayloadError, SourceUnavailable
from registry.payload import ModelSection, RegistryPayload
from registry.record import iso_utc
from registry.redis_client import pack_value, redis_from_url, unpack_value
from registry.settings import RegistrySettings
from registry.signing import PayloadCodec
from registry.sources.payload_source import PayloadSource



def _as_bytes(raw: bytes | str) -> bytes:
    """A value as read: bytes (the client does not decode responses; typed as either by redis-py)."""
    return raw if isinstance(raw, bytes) else raw.encode("utf-8")

class RedisCacheSource(PayloadSource):
    """The cache: one pooled client, short timeouts, redis-py's own retry with backoff."""

    source_id = "redis"
    tag = "[CACHE]"
    live_registry = True

    def __init__(self, url: str, *, key: str, ttl: int, timeout: float, codec: Optional[PayloadCodec] = None,
                 compress_above: int = 0):
        super().__init__(codec)
        self.key = key
        self.ttl = ttl
        self.compress_above = compress_above
        # A plain server or a Sentinel-managed master (registry.redis_client); SettingsError for a bad URL.
        self.client = redis_from_url(url, timeout=timeout, retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1))

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> Optional["RedisCacheSource"]:
        if not settings.redis_url:
            return None
        return cls(settings.redis_url, key=settings.cache_key, ttl=settings.cache_ttl, timeout=settings.redis_timeout,
                   codec=PayloadCodec.from_secret(settings.signing_key), compress_above=settings.cache_compress_above)

    def _encode(self, payload: RegistryPayload) -> bytes | str:
        """Signed JSON, gzip'ed above `compress_above` bytes: the signature covers the JSON, not the gzip."""
        return pack_value(self.codec.encode(payload), self.compress_above)

    #: A stored value may be gzip'ed, whatever this writer's own setting.
    _unpack = staticmethod(unpack_value)

    def load_payload(self) -> Optional[RegistryPayload]:
        try:
            raw = self.client.get(self.key)
        except redis.RedisError as exc:
            raise SourceUnavailable(self.source_id, f"{type(exc).__name__}: {exc}") from exc
        if raw is None:
            return None
        where = f"redis key {self.key!r}"
        return self.decode(_as_bytes(raw), where=where)

    def store_section(self, section: ModelSection, *, replace: bool = False) -> None:
        """Merge one model's section into the cached payload, atomically (WATCH/MULTI, retried by redis-py).

        With `replace`, the section replaces what the cache holds for the model (the authority's
        whole answer: versions deleted in the registry go too).
        """

        def merge(pipe: redis.client.Pipeline) -> None:
            raw = pipe.get(self.key)
            try:
                current = self.codec.decode(unpack_value(_as_bytes(raw), "redis"), where="redis") if raw is not None else RegistryPayload.empty()
            except PayloadError:
                current = RegistryPayload.empty()  # a corrupt cache value is replaced, the registry below is intact
            pipe.multi()
            updated = current.with_section(section) if replace else current.merge_section(section)
            pipe.set(self.key, self._encode(updated), ex=self.ttl)

        try:
            self.client.transaction(merge, self.key)
        except redis.RedisError as exc:
            raise SourceUnavailable(self.source_id, f"write failed: {type(exc).__name__}: {exc}") from exc

    def store_payload(self, payload: RegistryPayload) -> None:
        try:
            self.client.set(self.key, self._encode(payload), ex=self.ttl)
        except redis.RedisError as exc:
            raise SourceUnavailable(self.source_id, f"write failed: {type(exc).__name__}: {exc}") from exc

    def health_detail(self, payload: Optional[RegistryPayload]) -> str:
        if payload is None:
            return f"key {self.key!r} absent"
        try:
            ttl = f"ttl {self.client.ttl(self.key)}s"
        except redis.RedisError as exc:
            ttl = f"ttl unknown ({type(exc).__name__})"
        return f"key {self.key!r} {ttl}, timestamp {iso_utc(payload.written_at) or payload.timestamp}"

    def close(self) -> None:
        self.client.close()
