"""The registry payload shared by Redis, the training API and the file backup.

```
{"latest_models": {name: ENTRY}, "best_models": {name: ENTRY},
 "versions": {name: [ENTRY, ...]}, "timestamp": "..."}
```

The top-level shape is checked when a payload is parsed; each model's entries are checked when
that model is asked for, so one broken model does not hide the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

from registry.errors import PayloadError
from registry.record import BEST, ModelRecord, Selector

SECTIONS = ("latest_models", "best_models", "versions")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ModelSection:
    """Everything the registry says about one model."""

    name: str
    latest: Optional[ModelRecord] = None
    best: Optional[ModelRecord] = None
    versions: tuple[ModelRecord, ...] = ()

    @classmethod
    def from_records(cls, name: str, versions: list[ModelRecord], best: Optional[ModelRecord] = None) -> "ModelSection":
        ordered = tuple(sorted(versions, key=lambda r: r.version_number))
        if best is None:
            best = next((r for r in reversed(ordered) if BEST in r.aliases), None)
        return cls(name=name, latest=ordered[-1] if ordered else None, best=best, versions=ordered)

    def all_records(self) -> list[ModelRecord]:
        return [r for r in (self.latest, self.best, *self.versions) if r is not None]

    def select(self, selector: Selector, *, custom_aliases: bool) -> Optional[ModelRecord]:
        """The record the selector names, or None when this section does not hold it.

        Args:
            custom_aliases: answer aliases other than `best` from the entries' alias lists.
        """
        if selector.kind == "latest":
            candidates = self.all_records()
            return max(candidates, key=lambda r: r.version_number) if candidates else None
        if selector.kind == "version":
            return next((r for r in self.all_records() if r.version == selector.value), None)
        if selector.value == BEST:
            if self.best is not None:
                return self.best
            return next((r for r in reversed(self.versions) if BEST in r.aliases), None)
        if not custom_aliases:
            return None
        return next((r for r in reversed(self.versions) if selector.value in r.aliases), None)

    def merged_with(self, older: Optional["ModelSection"]) -> "ModelSection":
        """This (newer) section over an older one: no version is lost when two writers race.

        Versions are united (the newer entry wins for a version both hold); `latest` is the
        highest; `best` is the newer section's, else the older one's.
        """
        if older is None:
            return self
        by_version = {r.version: r for r in older.all_records()}
        by_version.update({r.version: r for r in self.versions})
        for extra in (self.latest, self.best):
            if extra is not None:
                by_version.setdefault(extra.version, extra)
        ordered = tuple(sorted(by_version.values(), key=lambda r: r.version_number))
        return ModelSection(name=self.name, latest=ordered[-1] if ordered else None,
                            best=self.best or older.best, versions=ordered)

    def entries(self) -> dict[str, Any]:
        return {
            "latest": self.latest.to_entry() if self.latest else None,
            "best": self.best.to_entry() if self.best else None,
            "versions": [r.to_entry() for r in self.versions],
        }


@dataclass(frozen=True)
class RegistryPayload:
    """A parsed registry payload; raw model data stays raw until a model is asked for."""

    raw: Mapping[str, Any] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    where: str = "payload"

    @classmethod
    def empty(cls) -> "RegistryPayload":
        return cls({"latest_models": {}, "best_models": {}, "versions": {}, "timestamp": utc_now()})

    @classmethod
    def parse(cls, data: object, where: str) -> "RegistryPayload":
        """Check the top-level shape of bytes, text or an already decoded object."""
        if isinstance(data, (bytes, bytearray)):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PayloadError(where, f"not UTF-8 text ({exc})") from exc
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, deep nesting
                raise PayloadError(where, f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from exc
        if not isinstance(data, Mapping):
            raise PayloadError(where, f"expected a JSON object, got {type(data).__name__}")
        if "latest_models" not in data:
            raise PayloadError(where, "missing 'latest_models'")
        for key in SECTIONS:
            if key in data and not isinstance(data[key], Mapping):
                raise PayloadError(where, f"'{key}' must be an object keyed by model name")
        return cls(data, where)

    @property
    def timestamp(self) -> Optional[str]:
        ts = self.raw.get("timestamp")
        return ts if isinstance(ts, str) else None

    @property
    def written_at(self) -> Optional[float]:
        """The timestamp as epoch seconds (naive timestamps, as the seed wrote them, are taken as UTC)."""
        ts = self.timestamp
        if not ts:
            return None
        try:
            parsed = datetime.fromisoformat(ts)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()

    def model_names(self) -> list[str]:
        names: set[str] = set()
        for key in SECTIONS:
            names.update(self.raw.get(key, {}) or {})
        return sorted(names)

    def section(self, name: str, *, source: str) -> Optional[ModelSection]:
        """The model's section, validated; None when the payload knows nothing of the model."""
        latest_raw = (self.raw.get("latest_models") or {}).get(name)
        best_raw = (self.raw.get("best_models") or {}).get(name)
        versions_raw = (self.raw.get("versions") or {}).get(name)
        if latest_raw is None and best_raw is None and not versions_raw:
            return None
        where = f"{self.where} model {name!r}"
        if versions_raw is not None and not isinstance(versions_raw, list):
            raise PayloadError(where, "'versions' entry must be a list")
        latest = None if latest_raw is None else ModelRecord.from_entry(latest_raw, source=source, name=name, where=f"{where} latest")
        best = None if best_raw is None else ModelRecord.from_entry(best_raw, source=source, name=name, where=f"{where} best")
        versions = tuple(
            ModelRecord.from_entry(e, source=source, name=name, where=f"{where} versions[{i}]") for i, e in enumerate(versions_raw or [])
        )
        return ModelSection(name=name, latest=latest, best=best, versions=versions)

    @classmethod
    def from_sections(cls, sections: Iterable[ModelSection], where: str = "payload") -> "RegistryPayload":
        """A payload holding exactly these sections, built in one pass."""
        data: dict[str, Any] = {key: {} for key in SECTIONS}
        for section in sections:
            data = _put_section(data, section)
        data["timestamp"] = utc_now()
        return cls(data, where)

    def merge_section(self, section: ModelSection) -> "RegistryPayload":
        """A copy with the section merged over what this payload holds for the model (see `merged_with`)."""
        try:
            older = self.section(section.name, source=section.latest.source if section.latest else "")
        except PayloadError:
            older = None  # a broken entry for this model is replaced, not merged
        return self.with_section(section.merged_with(older))

    def with_section(self, section: ModelSection) -> "RegistryPayload":
        """A copy with one model's section replaced (the others kept as they are)."""
        data = _put_section({key: dict(self.raw.get(key) or {}) for key in SECTIONS}, section)
        data["timestamp"] = utc_now()
        return RegistryPayload(data, self.where)


def _put_section(data: dict[str, Any], section: ModelSection) -> dict[str, Any]:
    """Set one model's entries in the (already copied) section dicts of `data`."""
    entries = section.entries()
    for key, value in (("latest_models", entries["latest"]), ("best_models", entries["best"])):
        if value is None:
            data[key].pop(section.name, None)
        else:
            data[key][section.name] = value
    data["versions"][section.name] = entries["versions"]
    return data
