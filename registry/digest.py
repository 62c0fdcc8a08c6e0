"""A content digest of a model artifact (a file or a directory tree), the same wherever it was fetched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(root: str | os.PathLike[str]) -> str:
    """sha256 over every file's relative path and content digest, in sorted order.

    Symbolic links are refused (an artifact pointing outside itself is not an artifact).
    """
    root = Path(root)
    if root.is_file():
        return file_sha256(root)
    digest = hashlib.sha256()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in filenames:
            full = Path(dirpath, fname)
            if full.is_symlink():
                raise ValueError(f"symbolic link in artifact: {full}")
            entries.append((full.relative_to(root).as_posix(), full))
    for rel, full in sorted(entries):
        digest.update(rel.encode("utf-8") + b"\0" + file_sha256(full).encode("ascii") + b"\n")
    return digest.hexdigest()
