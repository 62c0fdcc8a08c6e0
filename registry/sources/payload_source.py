"""Shared lookup for the layers that hold a whole registry payload (Redis, training API, file)."""

from __future__ import annotations

import abc
from typing import Optional

from registry.payload import RegistryPayload
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

    @abc.abstractmethod
    def load_payload(self) -> Optional[RegistryPayload]:
        """The payload, None when the layer holds none; raises SourceUnavailable or PayloadError."""

    def lookup(self, name: str, selector: Selector) -> Optional[Answer]:
        payload = self.load_payload()
        if payload is None:
            return None
        section = payload.section(name, source=self.source_id)
        if section is None:
            return None
        record = section.select(selector, custom_aliases=self.custom_aliases)
        return None if record is None else Answer(record, section, as_of=payload.written_at)
