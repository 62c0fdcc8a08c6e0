"""Shared lookup for the layers that hold a whole registry payload (Redis, training API, file)."""

from __future__ import annotations

import abc
import time
from typing import Callable, Iterable, Optional

from registry.errors import PayloadError, SourceUnavailable
from registry.payload import ModelSection, RegistryPayload
from registry.record import BEST, Selector
from registry.signing import PayloadCodec
from registry.sources.base import Answer, LayerHealth, RegistrySource, payload_summary


class PayloadSource(RegistrySource):
    """A layer whose data is one registry payload; subclasses say how to load it."""

    #: whether aliases other than `best` are answered from the entries' alias lists
    custom_aliases: bool = False

    def __init__(self, codec: Optional[PayloadCodec] = None):
        super().__init__()
        self.codec = codec or PayloadCodec()
        # The last payload read, by its exact bytes, with the model sections already validated:
        # an unchanged cache value is parsed, verified and checked once, not on every resolution.
        self._parsed: Optional[tuple[bytes, RegistryPayload, dict[str, Optional[ModelSection]]]] = None

    def decode(self, raw: bytes, where: str) -> RegistryPayload:
        """The payload of a stored value (remembered by the stored bytes: unpacked and parsed once)."""
        parsed = self._parsed
        if parsed is not None and parsed[0] == raw:
            return parsed[1]
        payload = self.codec.decode(self._unpack(raw, where), where)
        self._parsed = (bytes(raw), payload, {})
        return payload

    def store_section(self, section: ModelSection, *, replace: bool = False) -> None:
        """Write one model's section into the payload (the layers the chain writes back to: cache, backup)."""
        raise NotImplementedError(f"the {self.source_id} layer is read, never written")

    @staticmethod
    def _unpack(raw: bytes, where: str) -> bytes:
        """The payload text of a stored value; a layer that stores it otherwise (gzip) says how to read it."""
        return raw

    def _section(self, payload: RegistryPayload, name: str) -> Optional[ModelSection]:
        parsed = self._parsed
        sections = parsed[2] if parsed is not None and parsed[1] is payload else None
        if sections is not None and name in sections:
            return sections[name]
        section = payload.section(name, source=self.source_id)  # raises PayloadError: never remembered
        if sections is not None:
            sections[name] = section
        return section

    @abc.abstractmethod
    def load_payload(self) -> Optional[RegistryPayload]:
        """The payload, None when the layer holds none; raises SourceUnavailable or PayloadError."""

    def miss_detail(self, selector: Selector) -> str:
        if selector.kind == "alias" and selector.value != BEST and not self.custom_aliases:
            return "custom aliases are answered by MLflow"
        return ""

    def health_detail(self, payload: Optional[RegistryPayload]) -> str:
        """What the layer says about itself beside the payload (location, TTL, write errors)."""
        return ""

    def health(self, models: list[str]) -> LayerHealth:
        start = time.perf_counter()
        try:
            payload = self.load_payload()
        except (SourceUnavailable, PayloadError) as exc:
            # Garbage means the layer answered: reachable, but what it holds is unusable.
            return LayerHealth(self.source_id, isinstance(exc, PayloadError), (time.perf_counter() - start) * 1000, str(exc))
        elapsed = (time.perf_counter() - start) * 1000
        return LayerHealth(self.source_id, True, elapsed, self.health_detail(payload), payload_summary(payload, models, self.source_id))

    def lookup(self, name: str, selector: Selector) -> Optional[Answer]:
        payload = self.load_payload()
        if payload is None:
            return None
        section = self._section(payload, name)
        if section is None:
            return None
        record = section.select(selector, custom_aliases=self.custom_aliases)
        return None if record is None else Answer(record, section, as_of=payload.written_at)


def write_all(targets: Iterable[Optional[PayloadSource]], write: Callable[[PayloadSource], None], why: str) -> None:
    """Write to every configured target (cache, backup); one that fails is logged, the others still written."""
    from registry.metrics import metrics

    for target in targets:
        if target is None:
            continue
        try:
            write(target)
        except SourceUnavailable as exc:
            metrics().cache_writes.labels(target.source_id, "failed").inc()
            target.note_failure(why, exc.reason)
        else:
            metrics().cache_writes.labels(target.source_id, "ok").inc()
