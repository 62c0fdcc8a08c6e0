"""mkdocs hook: the configuration page's table comes from the settings classes (docs/configuration.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != "configuration.md":
        return markdown
    if str(ROOT) not in sys.path:  # mkdocs restores sys.path after loading a hook: import the project now
        sys.path.insert(0, str(ROOT))
    from docs.configuration import MARKER, render

    if MARKER not in markdown:
        raise ValueError(f"configuration.md lost its {MARKER} marker")
    return render(markdown)
