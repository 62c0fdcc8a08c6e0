"""Model artifacts on local disk: fetched once from storage or MLflow, verified, then cached.

A cached version loads again with MLflow and S3 down, so a service restarts on what it served.
Cache layout, one entry per name, version and digest:

    <artifact_cache>/<name>/<version>/<sha256 or "unverified">/artifact/   the files as stored
    <artifact_cache>/<name>/<version>/<sha256 or "unverified">/.complete   written last
    <artifact_cache>/<name>/<version>/.<sha256 or "unverified">.lock       one fetcher at a time
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from registry.allowlist import AllowList
from registry.digest import tree_sha256
from registry.errors import ArtifactError
from registry.files import locked
from registry.mlflow_env import mlflow_uris
from registry.record import ModelRecord
from registry.settings import RegistrySettings

logger = logging.getLogger(__name__)

ARTIFACT_DIR = "artifact"
COMPLETE_MARKER = ".complete"
UNVERIFIED = "unverified"
#: Seconds to wait for another worker's download of the same artifact.
FETCH_LOCK_TIMEOUT = 600.0
HUGGINGFACE_SOURCE = "huggingface"

#: Written by MLflow beside a model it downloads through a `models:/` URI; it is not part of the
#: stored artifact (mlflow/store/artifact/models_artifact_repo.py), so it must not enter the digest.
_REGISTERED_MODEL_META = "registered_model_meta"

# Names become directory names in the cache: no separators, no `.`/`..`.
_SAFE_NAME_RE = re.compile(r"^(?!\.{1,2}$)[\w.\-]+$")


class ArtifactStore:
    """Fetches a record's artifact into the local cache, verifies its digest, and hands out the directory."""

    def __init__(self, settings: RegistrySettings):
        self.settings = settings
        self.root = Path(settings.artifact_cache)
        self.allow = AllowList.from_settings(settings)

    def fetch(self, record: ModelRecord) -> Union[Path, str]:
        """A local directory holding the record's artifact.

        Args:
            record: the resolved version.

        Returns:
            The artifact directory; for a Hugging Face fallback that names a hub id rather than a
            local directory, the hub id itself (`from_pretrained` resolves it through its own cache).

        Raises:
            ArtifactError: refused by the allow-list, not downloadable, or a digest mismatch.
        """
        self.check_allowed(record)
        if record.source == HUGGINGFACE_SOURCE:
            return self._fallback_location(record)
        if not _SAFE_NAME_RE.match(record.name):
            raise ArtifactError(record.location, f"model name {record.name!r} cannot name a cache directory")
        entry = self.entry_dir(record)
        version_dir = entry.parent
        try:
            version_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(record.location, f"cannot create artifact cache {version_dir}: {exc}") from exc
        with self._locked(version_dir / f".{entry.name}.lock", record):
            cached = self._cached(record, entry)
            if cached is not None:
                return cached
            return self._download(record, entry)

    def check_allowed(self, record: ModelRecord) -> None:
        """Refuse a record that names a location outside `settings.allowed_uris` (empty = any)."""
        self.allow.check(record, fallback=record.source == HUGGINGFACE_SOURCE)

    @staticmethod
    def _fallback_location(record: ModelRecord) -> Union[Path, str]:
        local = Path(record.model_uri)
        if local.is_dir():
            logger.info("[FALLBACK] %s uses the local directory %s", record.name, local)
            return local
        if local.exists() or record.model_uri.startswith((".", "/")):
            raise ArtifactError(record.model_uri, "fallback location is neither a directory nor a hub id")
        logger.info("[FALLBACK] %s uses the hub id %s", record.name, record.model_uri)
        return record.model_uri

    @staticmethod
    def _locked(lock_path: Path, record: ModelRecord) -> contextlib.AbstractContextManager[None]:
        # Waits while another process or worker fetches the same entry; it then finds the cache filled.
        return locked(lock_path, FETCH_LOCK_TIMEOUT, lambda reason: ArtifactError(record.location, reason))

    def entry_dir(self, record: ModelRecord) -> Path:
        """Where the cache keeps a record's artifact: by name, version and digest."""
        return self.root / record.name / record.version / (record.sha256 or UNVERIFIED)

    @staticmethod
    def complete_artifact(entry: Path) -> Optional[Path]:
        """The artifact directory of a cache entry whose download completed, else None."""
        artifact = entry / ARTIFACT_DIR
        return artifact if (entry / COMPLETE_MARKER).is_file() and artifact.is_dir() else None

    @staticmethod
    def digest(artifact: Path) -> str:
        """The artifact's tree digest, or why it could not be read (never equal to a real digest)."""
        try:
            return tree_sha256(artifact)
        except (OSError, ValueError) as exc:
            return f"unreadable ({exc})"

    def _cached(self, record: ModelRecord, entry: Path) -> Optional[Path]:
        artifact = self.complete_artifact(entry)
        if artifact is None:
            if entry.exists():
                logger.warning("[HYBRID] removing incomplete cache entry %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
            return None
        if record.sha256:
            actual = self.digest(artifact)
            if actual != record.sha256:
                logger.warning("[HYBRID] cached %s v%s fails its digest (got %s); fetching again", record.name, record.version, actual)
                shutil.rmtree(entry, ignore_errors=True)
                return None
        logger.info("[HYBRID] %s v%s from the artifact cache %s", record.name, record.version, artifact)
        return artifact

    def _download(self, record: ModelRecord, entry: Path) -> Path:
        # Build the whole entry in a temporary sibling, then rename it into place in one step: a
        # reader sees either no entry or a complete one, and a failure leaves nothing behind.
        try:
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        except OSError as exc:
            raise ArtifactError(record.location, f"cannot write to the artifact cache {entry.parent}: {exc}") from exc
        try:
            downloaded = self._download_into(record, staging / "download")
            self._verify(record, downloaded)
            os.replace(downloaded, staging / ARTIFACT_DIR)
            shutil.rmtree(staging / "download", ignore_errors=True)
            (staging / COMPLETE_MARKER).write_text(record.sha256 or UNVERIFIED)
            os.replace(staging, entry)
        except OSError as exc:
            raise ArtifactError(record.location, f"cannot store the artifact in {entry}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return entry / ARTIFACT_DIR

    def _download_into(self, record: ModelRecord, dst: Path) -> Path:
        """Try the direct storage location first (no tracking server needed), then the registry URI."""
        import mlflow

        failures = []
        if record.artifact_uri:
            try:
                (dst / "direct").mkdir(parents=True)
                if record.artifact_uri.startswith("s3://"):
                    direct = self._download_s3(record.artifact_uri, dst / "direct")
                else:
                    direct = Path(mlflow.artifacts.download_artifacts(artifact_uri=record.artifact_uri, dst_path=str(dst / "direct")))
                logger.info("[MLFLOW] downloaded %s v%s from %s", record.name, record.version, record.artifact_uri)
                return direct
            except Exception as exc:  # MLflow, boto and OS errors all mean: this location failed
                logger.warning("[MLFLOW] download of %s from %s failed: %s", record.name, record.artifact_uri, exc)
                failures.append((record.artifact_uri, exc))
        # `models:/` leads to the same storage: when that storage did not answer, asking again
        # through MLflow (whose S3 client waits 60 s per read) only holds the reload longer.
        from botocore.exceptions import ConnectionError as StorageUnreachable
        from botocore.exceptions import HTTPClientError as StorageTimeout

        storage_down = any(isinstance(exc, (StorageUnreachable, StorageTimeout)) for _, exc in failures)
        if record.model_uri != record.artifact_uri and not storage_down:
            tracking_uri = self.settings.mlflow_tracking_uri
            try:
                (dst / "registry").mkdir(parents=True)
                with mlflow_uris(tracking_uri):
                    local = Path(
                        mlflow.artifacts.download_artifacts(
                            artifact_uri=record.model_uri, dst_path=str(dst / "registry"), tracking_uri=tracking_uri, registry_uri=tracking_uri
                        )
                    )
                (local / _REGISTERED_MODEL_META).unlink(missing_ok=True)
                logger.info("[MLFLOW] downloaded %s v%s from %s", record.name, record.version, record.model_uri)
                return local
            except Exception as exc:  # as above
                logger.warning("[MLFLOW] download of %s from %s failed: %s", record.name, record.model_uri, exc)
                failures.append((record.model_uri, exc))
        reasons = "; ".join(f"{uri}: {type(exc).__name__}: {exc}" for uri, exc in failures)
        raise ArtifactError(record.location, f"download failed ({reasons})") from failures[-1][1]

    def _download_s3(self, uri: str, dst: Path) -> Path:
        """Every object under an `s3://bucket/prefix`, with bounded timeouts and botocore's own retries.

        MLflow's S3 client keeps botocore's 60 s read timeout and offers no setting for it; a
        paused S3 must not hold a reload or a start-up for minutes.
        """
        import boto3
        from botocore.config import Config

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        prefix = prefix.rstrip("/") + "/"
        timeout = self.settings.s3_timeout
        client = boto3.client(
            "s3",
            endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None,
            config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2, "mode": "standard"}),
        )
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix):]
                target = (dst / relative).resolve()
                if not relative or not str(target).startswith(str(dst.resolve()) + os.sep):
                    raise ArtifactError(uri, f"object key {obj['Key']!r} escapes the artifact directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(target))
                count += 1
        if count == 0:
            raise ArtifactError(uri, "no objects under this location")
        return dst

    @staticmethod
    def _verify(record: ModelRecord, local: Path) -> None:
        if not record.sha256:
            logger.warning("[HYBRID] %s v%s has no recorded sha256: its artifact is not verified", record.name, record.version)
            return
        try:
            actual = tree_sha256(local)
        except (OSError, ValueError) as exc:
            raise ArtifactError(record.location, f"cannot digest the downloaded artifact: {exc}") from exc
        if actual != record.sha256:
            raise ArtifactError(record.location, f"sha256 mismatch: expected {record.sha256}, got {actual}")
