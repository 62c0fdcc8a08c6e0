"""File backup layer: the registry payload as JSON on local disk, written atomically."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable, Optional

from registry.errors import PayloadError, SourceUnavailable
from registry.files import atomic_write, locked
from registry.payload import ModelSection, RegistryPayload
from registry.record import iso_utc
from registry.settings import RegistrySettings
from registry.signing import PayloadCodec
from registry.sources.payload_source import PayloadSource


#: Seconds a writer waits for another writer of the backup before the write counts as failed.
LOCK_TIMEOUT = 30.0


class FileBackupSource(PayloadSource):
    """Disaster recovery: always on; a missing file is a miss, a corrupt one is rejected."""

    source_id = "file"
    tag = "[FALLBACK]"
    registry_copy = True
    custom_aliases = True  # the last registry layer answers pinned aliases from what it last saw

    def __init__(self, path: Path, codec: Optional[PayloadCodec] = None):
        super().__init__(codec)
        self.path = Path(path)
        self.last_write_error: Optional[str] = None  # disk full, read-only: reported by health

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> "FileBackupSource":
        return cls(settings.backup_path, PayloadCodec.from_secret(settings.signing_key))

    def load_payload(self) -> Optional[RegistryPayload]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SourceUnavailable(self.source_id, f"cannot read {self.path}: {exc}") from exc
        return self.decode(data, where=f"backup file {self.path}")

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise writers (threads, workers, publishers) on a lock file beside the backup."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return locked(self.path.with_name(self.path.name + ".lock"), LOCK_TIMEOUT,
                      lambda reason: SourceUnavailable(self.source_id, reason))

    def store_section(self, section: ModelSection, *, replace: bool = False) -> None:
        """Merge one model's section into the file (read-merge-write under a lock); `replace` drops what it held."""
        self._store(lambda current: current.with_section(section) if replace else current.merge_section(section))

    def store_payload(self, payload: RegistryPayload) -> None:
        self._store(lambda _: payload)

    def _store(self, update: Callable[[RegistryPayload], RegistryPayload]) -> None:
        """Under the lock: read what the file holds (a corrupt file is kept aside), update, write atomically."""
        try:
            with self._locked():
                try:
                    current = self.load_payload() or RegistryPayload.empty()
                except PayloadError as exc:
                    aside = self._quarantine()
                    self.logger.warning("%s backup file %s was corrupt (%s); kept as %s", self.tag, self.path, exc, aside)
                    current = RegistryPayload.empty()
                self._write(update(current))
        except OSError as exc:
            self._write_failed(str(exc))
            raise SourceUnavailable(self.source_id, f"cannot write {self.path}: {exc}") from exc
        except SourceUnavailable as exc:  # the lock file could not be opened, or another writer held it too long
            self._write_failed(exc.reason)
            raise
        self.last_write_error = None

    def _write_failed(self, cause: str) -> None:
        self.last_write_error = f"{iso_utc(time.time())}: {cause}"

    def _quarantine(self) -> Path:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        os.replace(self.path, aside)
        return aside

    def _write(self, payload: RegistryPayload) -> None:
        atomic_write(self.path, self.codec.encode(payload))

    def health_detail(self, payload: Optional[RegistryPayload]) -> str:
        detail = f"{self.path} " + ("absent" if payload is None else f"timestamp {iso_utc(payload.written_at) or payload.timestamp}")
        if self.last_write_error:
            detail += f"; last write failed at {self.last_write_error}"
        return detail
