"""The values that flow through the chain: a selector in, a ModelRecord and its trail out."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional

from registry.errors import PayloadError, SelectorError, safe_repr
from registry.trail import LayerAttempt, Outcome  # noqa: F401 - part of this module's API


def iso_utc(epoch: Optional[float]) -> Optional[str]:
    """Epoch seconds as the one time format of every answer: ISO 8601 in UTC (`2026-11-26T12:00:00.250+00:00`)."""
    from datetime import datetime, timezone

    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


LATEST = "latest"
BEST = "best"
# ASCII only and matched whole (`fullmatch`): `\d` would take any Unicode digit and `$` a trailing newline.
_ALIAS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,254}")
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
_RESERVED_ALIAS_RE = re.compile(r"(?i:latest)|[vV][0-9]+")  # MLflow refuses these alias names
_MAX_VERSION = 10**18


@dataclass(frozen=True)
class Selector:
    """Which version of a model: the highest (`latest`), an MLflow alias, or an exact version."""

    kind: str  # "latest" | "alias" | "version"
    value: str

    @classmethod
    def parse(cls, raw: object) -> "Selector":
        if isinstance(raw, Selector):
            return raw
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise SelectorError(raw, "expected a string or an integer version")
        if isinstance(raw, int) and not 0 < raw < _MAX_VERSION:
            raise SelectorError(raw, "a version is a positive integer below 10**18")
        text = str(raw).strip()
        if text == LATEST:
            return cls("latest", LATEST)
        if _VERSION_RE.fullmatch(text):
            return cls("version", text)
        if _RESERVED_ALIAS_RE.fullmatch(text):
            raise SelectorError(raw, "MLflow reserves this alias name ('latest' and 'v<number>')")
        if _ALIAS_RE.fullmatch(text):
            return cls("alias", text)
        raise SelectorError(raw, "use 'latest', 'best', an alias ([A-Za-z_][A-Za-z0-9_-]*) or a positive version number")

    @classmethod
    def from_request(cls, alias: object = None, version: object = None, default: str = LATEST) -> "Selector":
        """The selector of a reload request: an exact version wins over an alias."""
        if version is not None:
            sel = cls.parse(version)
            if sel.kind != "version":
                raise SelectorError(version, "version must be a positive integer")
            return sel
        return cls.parse(default if alias is None else alias)

    def __str__(self) -> str:
        return self.value


def _version_str(value: object, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _MAX_VERSION:
        return str(value)
    if isinstance(value, str) and _VERSION_RE.fullmatch(value):
        return value
    raise PayloadError(where, f"version must be a positive integer, got {safe_repr(value)}")


def _metrics(value: object, where: str) -> dict[str, float]:
    """Names to floats; NaN and infinities are kept (a diverged run's loss is data, not garbage)."""
    if not isinstance(value, Mapping):
        raise PayloadError(where, "'metrics' must map names to numbers")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PayloadError(where, "'metrics' must map names to numbers")
        try:
            out[k] = float(v)
        except OverflowError:  # an integer too large for a float
            out[k] = math.inf if v > 0 else -math.inf
    return out


def _opt_str(entry: Mapping[str, Any], key: str, where: str) -> Optional[str]:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(where, f"{key!r} must be a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ModelRecord:
    """A resolved model version: where it lives, how good it is, and which layer said so."""

    name: str
    version: str
    model_uri: str
    artifact_uri: Optional[str] = None
    run_id: Optional[str] = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    sha256: Optional[str] = None
    source: str = ""
    created_at: Optional[str] = None

    @property
    def version_number(self) -> int:
        return int(self.version)

    @property
    def location(self) -> str:
        """The most direct place to load the artifact from."""
        return self.artifact_uri or self.model_uri

    def to_entry(self) -> dict[str, Any]:
        """The payload ENTRY (the source layer is not part of registry data)."""
        return {
            "name": self.name,
            "version": self.version,
            "model_uri": self.model_uri,
            "artifact_uri": self.artifact_uri,
            "run_id": self.run_id,
            "metrics": dict(self.metrics),
            "aliases": list(self.aliases),
            "sha256": self.sha256,
            "created_at": self.created_at,
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"] = dict(self.metrics)
        data["aliases"] = list(self.aliases)
        return data

    def with_source(self, source: str) -> "ModelRecord":
        return replace(self, source=source)

    @classmethod
    def from_entry(cls, entry: object, *, source: str, name: Optional[str] = None, where: str = "entry") -> "ModelRecord":
        """Validate one payload ENTRY; raises PayloadError naming what is wrong."""
        if not isinstance(entry, Mapping):
            raise PayloadError(where, f"expected an object, got {type(entry).__name__}")
        entry_name = entry.get("name", name)
        if not isinstance(entry_name, str) or not entry_name:
            raise PayloadError(where, "'name' must be a non-empty string")
        if name is not None and entry_name != name:
            raise PayloadError(where, f"entry is for model {entry_name!r}, expected {name!r}")
        version = _version_str(entry.get("version"), where)
        model_uri = entry.get("model_uri")
        if not isinstance(model_uri, str) or not model_uri:
            raise PayloadError(where, "'model_uri' must be a non-empty string")
        metrics = _metrics(entry.get("metrics") or {}, where)
        aliases = entry.get("aliases") or []
        if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) for a in aliases):
            raise PayloadError(where, "'aliases' must be a list of strings")
        sha = _opt_str(entry, "sha256", where)
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise PayloadError(where, "'sha256' must be 64 lowercase hex digits")
        created = entry.get("created_at")
        if created is not None and not (
            isinstance(created, str)
            or (isinstance(created, (int, float)) and not isinstance(created, bool) and math.isfinite(created) and abs(created) < 1e15)
        ):
            raise PayloadError(where, "'created_at' must be a string or a timestamp")
        return cls(
            name=entry_name,
            version=version,
            model_uri=model_uri,
            artifact_uri=_opt_str(entry, "artifact_uri", where),
            run_id=_opt_str(entry, "run_id", where),
            metrics=metrics,
            aliases=tuple(aliases),
            sha256=sha,
            source=source,
            created_at=None if created is None else str(created),
        )


@dataclass(frozen=True)
class Resolution:
    """The answer of the chain: the record, how each asked layer answered, and how fresh it is."""

    record: ModelRecord
    trail: tuple[LayerAttempt, ...]
    selector: Selector
    fetched_at: float = 0.0  # epoch seconds when a layer last vouched for this record
    stale: bool = False  # served from memory because the registry layers could not be asked

    def trail_dicts(self) -> list[dict[str, Any]]:
        return [a.to_dict() for a in self.trail]

    def stale_for(self, now: float) -> float:
        """Seconds this record has been served from memory without a layer vouching for it (0 when fresh)."""
        return max(0.0, now - self.fetched_at) if self.stale and self.fetched_at else 0.0

    def freshness(self, now: float) -> dict[str, Any]:
        return {"stale": self.stale, "fetched_at": iso_utc(self.fetched_at) if self.fetched_at else None,
                "age_s": round(max(0.0, now - self.fetched_at), 1) if self.fetched_at else None}
