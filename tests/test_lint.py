"""The linters configured in pyproject.toml pass: ruff on the whole tree, mypy on the packages."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.servers import VENV_BIN

REPO = Path(__file__).resolve().parent.parent


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / argv[0]), *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    done = _run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_mypy() -> None:
    done = _run("mypy", "--no-incremental")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
