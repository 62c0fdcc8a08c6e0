"""Shared lookup for the layers that hold a whole registry payload (Redis, training API, file)."""

from __future__ import annotations

import abc
from typing import Optional

from registry.payload import ModelSection, RegistryPayload
from registry.record import Selector
from registry.signing import PayloadCodec
from registry.sources.base import Answer, RegistrySource


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
        parsed = self._parsed
        if parsed is not None and parsed[0] == raw:
            return parsed[1]
        payload = self.codec.decode(raw, where)
        self._parsed = (bytes(raw), payload, {})
        return payload

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

    def lookup(self, name: str, selector: Selector) -> Optional[Answer]:
        payload = self.load_payload()
        if payload is None:
            return None
        section = self._section(payload, name)
        if section is None:
            return None
        record = section.select(selector, custom_aliases=self.custom_aliases)
        return None if record is None else Answer(record, section, as_of=payload.written_at)
