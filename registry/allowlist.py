"""Where a model may come from: `REGISTRY_ALLOWED_URIS`, checked before any download.

The resolver asks it of every hit (a record outside the list is that layer's `rejected` answer, and
the next layer is asked); the artifact store asks it again before it fetches anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

from registry.errors import ArtifactError
from registry.record import ModelRecord

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def _is_local(uri: str) -> bool:
    return uri.startswith("file:") or not _SCHEME_RE.match(uri)


def local_path(uri: str) -> str:
    """A local path or `file:` URI as a normal absolute path, so `..` cannot step out of an allowed prefix."""
    if uri.startswith("file:"):
        uri = url2pathname(urlparse(uri).path)
    return os.path.normpath(os.path.abspath(uri))


def under(uri: str, prefix: str) -> bool:
    """Whether `uri` lies under `prefix`; local paths compare whole path components."""
    if _is_local(uri) and _is_local(prefix):
        path, root = local_path(uri), local_path(prefix)
        return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
    return uri.startswith(prefix)


class AllowList:
    """URI prefixes a model may come from (empty = any), and the operator's own fallback directories."""

    def __init__(self, prefixes: Sequence[str], fallback_locations: Iterable[str] = ()):
        self.prefixes = list(prefixes)
        self.fallback_dirs = [local_path(v) for v in fallback_locations if Path(v).is_dir()]

    @classmethod
    def from_settings(cls, settings) -> "AllowList":
        return cls(settings.allowed_uris, settings.fallback_models.values())

    def check(self, record: ModelRecord, *, fallback: bool = False) -> None:
        """Refuse a record that names a location outside the prefixes.

        Raises:
            ArtifactError: naming the location and the prefixes.
        """
        if not self.prefixes:
            return
        if fallback:
            if Path(record.model_uri).is_dir():
                # Fallback directories are configured by the operator, not read from registry data.
                if local_path(record.model_uri) in self.fallback_dirs:
                    return
            elif any(record.model_uri.startswith(prefix) for prefix in self.prefixes):
                return  # a hub id is a name, not a path: compared as written
            uris = [record.model_uri]
        else:
            # Every location the record names must be allowed: either one may be downloaded from.
            uris = [u for u in (record.artifact_uri, record.model_uri) if u]
        for uri in uris:
            if not any(under(uri, prefix) for prefix in self.prefixes):
                raise ArtifactError(uri, f"not under an allowed prefix (REGISTRY_ALLOWED_URIS: {', '.join(self.prefixes)})")
