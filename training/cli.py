"""`registry-publish` / `python -m training.cli`: the former write-side command, now an alias of `registry`.

    python -m training.cli publish --name NAME --model-dir DIR --metric f1=0.93   = registry publish NAME --model-dir DIR ... --json
    python -m training.cli refresh --name NAME                                   = registry cache refresh --model NAME --json
    python -m training.cli resolve --name NAME [--selector S]                    = registry resolve NAME [--selector S] --json
    python -m training.cli promote --name NAME --version V [--alias A]           = registry promote NAME V [--alias A] --json
    python -m training.cli revoke  --name NAME --version V [--alias A]           = registry revoke NAME V [--alias A] --json

The old flags are turned into the new command's arguments and the answer is always JSON, as
before. The old exit codes are kept (0 ok, 2 anything wrong); `registry` itself tells an unhealthy
registry (1) from a usage or configuration error (2). Use `registry` in new scripts.
"""

from __future__ import annotations

import sys
from typing import Optional

COMMANDS = {"publish": ["publish"], "refresh": ["cache", "refresh"], "resolve": ["resolve"], "promote": ["promote"], "revoke": ["revoke"]}


def translate(argv: list[str]) -> list[str]:
    """The `registry` arguments for an old-style command line."""
    if not argv or argv[0] not in COMMANDS:
        return argv
    command, rest = argv[0], list(argv[1:])
    if any(a in ("-h", "--help") for a in rest):
        return [*COMMANDS[command], "--help"]
    name = _pop(rest, "--name")
    version = _pop(rest, "--version") if command in ("promote", "revoke") else None
    if command == "refresh":
        return [*COMMANDS[command], *(["--model", name] if name is not None else []), *rest, "--json"]
    positional = [v for v in (name, version) if v is not None]
    return [*COMMANDS[command], *positional, *rest, "--json"]


def _pop(args: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if arg.startswith(flag + "="):
            del args[i]
            return arg[len(flag) + 1:]
    return None


def main(argv: Optional[list[str]] = None) -> int:
    from registry.cli import main as registry_main

    code = registry_main(translate(list(sys.argv[1:] if argv is None else argv)))
    return 0 if code == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
