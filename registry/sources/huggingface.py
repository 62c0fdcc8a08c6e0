"""Hugging Face fallback: a pretrained classifier per model, when no registry layer answers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Optional

from registry.record import ModelRecord, Selector
from registry.settings import RegistrySettings
from registry.sources.base import Answer, LayerHealth, RegistrySource

FALLBACK_VERSION = "0"


class HuggingFaceFallbackSource(RegistrySource):
    """Answers with the configured directory or hub id; never registry data, never written back.

    It does not answer exact versions: pinning version N means N or an error, never a pretrained
    stand-in.
    """

    source_id = "huggingface"
    tag = "[FALLBACK]"
    stand_in = True

    def __init__(self, models: Mapping[str, str]):
        super().__init__()
        self.models = dict(models)

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> Optional["HuggingFaceFallbackSource"]:
        return cls(settings.fallback_models) if settings.fallback_models else None

    def lookup(self, name: str, selector: Selector) -> Optional[Answer]:
        location = self.models.get(name)
        if location is None or selector.kind == "version":
            return None
        record = ModelRecord(
            name=name,
            version=FALLBACK_VERSION,
            model_uri=location,
            artifact_uri=location,
            aliases=("pretrained",),
            source=self.source_id,
        )
        return Answer(record, section=None)

    def health(self, models: list[str]) -> LayerHealth:
        start = time.perf_counter()
        out: dict[str, dict[str, Any]] = {}
        for name in models:
            location = self.models.get(name)
            if location is None:
                out[name] = {"present": False}
            else:
                local = Path(location)
                out[name] = {"present": True, "location": location, "local": local.exists()}
        return LayerHealth(self.source_id, True, (time.perf_counter() - start) * 1000, "pretrained fallback", out)
