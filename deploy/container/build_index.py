"""This host's package indexes, handed to an image build and to nothing else (deploy/container/build).

    build_index.py STAGE --torch REQ   writes STAGE/xdg/{pip/pip.conf, uv/uv.toml, bento-build/ca.crt}
                                       (mounted read-only at /etc/xdg in every RUN of the build, where
                                       pip and uv read system-wide configuration) and prints shell
                                       assignments: SERVE_PORT, SERVE_ROOTS (local directories the
                                       indexes name), HOST_HAS_TORCH (the host's indexes hold REQ)
    build_index.py --serve PORT DIR..  serves those directories, read-only, on 127.0.0.1:PORT for the
                                       build (which runs with --network host), nothing else

The host's view is pip's own effective configuration (its files and PIP_* variables), as `pip config
list` and `pip install` see it; local paths and file:// URLs become http://127.0.0.1:PORT/<path>.
"""

from __future__ import annotations

import functools
import http.server
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

PYPI = "https://pypi.org/simple"


def pip_view() -> dict[str, list[str]]:
    from pip._internal.configuration import Configuration

    config = Configuration(isolated=False)
    config.load()
    view: dict[str, list[str]] = {}
    for _, values in config.items():  # per file, then the environment; later ones win
        for key, value in values.items():  # "global.extra-index-url", ":env:.find-links", ...
            view[key.split(".", 1)[-1].replace("_", "-")] = str(value).split()
    return view


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage(out: Path, torch_requirement: str) -> None:
    view = pip_view()
    port = free_port()
    roots: list[str] = []

    def reachable(location: str) -> str:
        """A URL the build can open: local paths and file:// URLs through the loopback server."""
        path = unquote(urlparse(location).path) if location.startswith("file:") else location
        if "://" in path:
            return location
        path = os.path.realpath(path)
        root = path if os.path.isdir(path) else os.path.dirname(path)
        # a simple index links to ../../files/...: serve from the directory above /simple
        if os.path.basename(root.rstrip("/")) == "simple":
            root = os.path.dirname(root.rstrip("/"))
        if root not in roots:
            roots.append(root)
        return f"http://127.0.0.1:{port}{path}"

    index = view.get("index-url", [PYPI])[0]
    extra = [reachable(u) for u in view.get("extra-index-url", [])]
    links = [reachable(u) for u in view.get("find-links", [])]
    index = reachable(index)

    xdg = out / "xdg"
    for sub in ("pip", "uv", "bento-build"):
        (xdg / sub).mkdir(parents=True, exist_ok=True)
    cert = (view.get("cert") or [os.environ.get("SSL_CERT_FILE", "")])[0]
    pip_lines = ["[global]", f"index-url = {index}"]
    if extra:
        pip_lines.append("extra-index-url = " + " ".join(extra))
    if links:
        pip_lines.append("find-links = " + " ".join(links))
    if cert and os.path.isfile(cert):
        shutil.copyfile(cert, xdg / "bento-build" / "ca.crt")
        pip_lines.append("cert = /etc/xdg/bento-build/ca.crt")
    if view.get("timeout") or view.get("default-timeout"):
        pip_lines.append(f"timeout = {(view.get('timeout') or view.get('default-timeout'))[0]}")
    (xdg / "pip" / "pip.conf").write_text("\n".join(pip_lines) + "\n")

    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    # pip merges every index; uv's default stops at the first index naming a package.
    uv_lines = [f'index-url = "{index}"', f"extra-index-url = {toml_list(extra)}", f"find-links = {toml_list(links)}",
                'index-strategy = "unsafe-best-match"']
    (xdg / "uv" / "uv.toml").write_text("\n".join(uv_lines) + "\n")

    name, _, version = torch_requirement.partition("==")
    wheel_prefix = f"{name}-{version}-"
    has_torch = any(p.name.startswith(wheel_prefix) for link in view.get("find-links", [])
                    if os.path.isdir(link) for p in Path(link).iterdir())
    print(f"SERVE_PORT={port}")
    print(f"SERVE_ROOTS={shlex.quote(' '.join(roots))}")
    print(f"HOST_HAS_TORCH={1 if has_torch else 0}")


class Handler(http.server.SimpleHTTPRequestHandler):
    roots: tuple[str, ...] = ()

    def translate_path(self, path: str) -> str:
        real = os.path.realpath(unquote(urlparse(path).path))
        if any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots):
            return real
        return "/nonexistent"

    def log_message(self, *args: object) -> None:
        pass


def serve(port: int, roots: list[str]) -> None:
    handler = functools.partial(Handler, directory="/")
    Handler.roots = tuple(os.path.realpath(r) for r in roots)
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[3:])
    else:
        stage(Path(sys.argv[1]), sys.argv[sys.argv.index("--torch") + 1])
