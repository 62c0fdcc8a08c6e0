"""Local files written by several threads, workers and processes: one atomic write, one lock."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout


def atomic_write(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace `path` with `text` in one step: a temp file in the same directory, then rename.

    Readers see the old content or the new one, never a torn file. With `durable`, the file and
    the directory are fsync'ed, so the new content survives a crash of the machine.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def locked(lock_path: Path, timeout: float, fail: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (threads and processes alike) for the block.

    Raises:
        the exception `fail(reason)` builds, when the lock cannot be had within `timeout`
        seconds or the lock file cannot be opened.
    """
    lock = FileLock(str(lock_path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise fail(f"lock {lock_path} held by another writer for more than {timeout:.0f}s") from None
    except OSError as exc:
        raise fail(f"cannot open lock file {lock_path}: {exc}") from exc
    try:
        yield
    finally:
        lock.release()
