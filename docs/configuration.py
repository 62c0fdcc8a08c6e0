"""The configuration reference, written from the settings classes themselves (their fields and docstrings).

    python -m docs.configuration            # print the table (docs/hooks.py puts it into configuration.md)

One source for every variable, its default and its meaning: `registry.settings.RegistrySettings`
(the plugin's) and `service.ClassifierSettings` (the service's own). tests/test_bento.py compares
this list with bentofile.yaml's `envs`.
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any, Iterator

from pydantic import AliasChoices, BaseModel, SecretStr
from pydantic.fields import FieldInfo

from registry.settings import ENV_PREFIX


def variable(field_name: str, field: FieldInfo) -> str:
    """The environment variable a settings field is read from: its first upper-case alias, else REGISTRY_<FIELD>."""
    alias = field.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
    for choice in choices:
        if isinstance(choice, str) and choice.isupper():
            return choice
    return ENV_PREFIX + field_name.upper()


def docstrings(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body, as one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    out: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            out[node.target.id] = " ".join(following.value.value.split())
    return out


def settings_classes() -> list[type[BaseModel]]:
    from registry.settings import RegistrySettings
    from service import ClassifierSettings

    return [RegistrySettings, ClassifierSettings]


def fields() -> Iterator[tuple[str, type[BaseModel], str, FieldInfo]]:
    """(variable, settings class, field name, field) of every setting, in the classes' order."""
    for cls in settings_classes():
        for name, field in cls.model_fields.items():
            yield variable(name, field), cls, name, field


def shown_default(field: FieldInfo) -> str:
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "unset"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def table() -> str:
    """The Markdown table of every variable: default and meaning."""
    docs = {cls: docstrings(cls) for cls in settings_classes()}
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, cls, field_name, field in fields():
        meaning = docs[cls].get(field_name, "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{shown_default(field)}` | {meaning} |")
    return "\n".join(rows) + "\n"


MARKER = "<!-- settings-table -->"


def render(markdown: str) -> str:
    """A page with the table where its marker stands."""
    return markdown.replace(MARKER, table())


if __name__ == "__main__":
    print(render(Path(__file__).with_name("configuration.md").read_text()) if Path(__file__).with_name("configuration.md").exists()
          else table())
