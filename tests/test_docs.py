"""The docs site builds strictly, and its configuration reference is the settings classes' own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from docs import configuration

REPO = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link, a missing page or a lost marker fails it."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    for variable, *_ in configuration.fields():
        assert variable in page, f"{variable} is not on the configuration page"
    assert configuration.MARKER not in page


def test_every_setting_has_a_docstring_and_every_declared_variable_a_row() -> None:
    table = configuration.table()
    documented = {line.split("`")[1] for line in table.splitlines()[2:]}
    for variable, cls, name, _ in configuration.fields():
        assert configuration.docstrings(cls).get(name), f"{cls.__name__}.{name} ({variable}) has no docstring"
    declared = {e["name"] for e in yaml.safe_load((REPO / "bentofile.yaml").read_text())["envs"]}
    assert documented <= declared and {n for n in declared if n.startswith("REGISTRY_")} <= documented


def test_the_nav_names_every_page() -> None:
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text().replace("!!python/name:", ""))["nav"]
    listed = {page for item in nav for page in item.values()}
    assert listed == {p.name for p in (REPO / "docs").glob("*.md")}
