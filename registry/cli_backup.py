"""`registry backup verify`: is the file backup usable when MLflow is down?

Checks the file's shape (what the file layer would parse), its signature when
`REGISTRY_SIGNING_KEY` is set, every model's entries, and for each entry with a sha256 the
artifact's digest: first in the local artifact cache (`REGISTRY_ARTIFACT_CACHE`), else
downloaded the way the runner downloads it (`runners.artifacts.ArtifactStore`) into a temporary
cache. Per entry: ok, mismatch, unreachable, refused (outside `REGISTRY_ALLOWED_URIS`) or
no_digest (nothing to check against; not counted as a problem). Exit 1 on any problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import click

from registry.cli_common import OK, UNHEALTHY, Output, Problem, age_s, check_names, esc, human_age, json_option, load_settings, \
    quiet_stdout
from registry.digest import tree_sha256
from registry.errors import ArtifactError, PayloadError
from registry.payload import RegistryPayload
from registry.record import ModelRecord
from registry.settings import RegistrySettings
from registry.signing import SIGNATURE_KEY, PayloadCodec, SignatureError

PROBLEMS = ("mismatch", "unreachable", "refused", "invalid")


@click.group()
def backup() -> None:
    """The file backup of the registry payload (REGISTRY_BACKUP_PATH)."""


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """The artifact store warns that an unverified fetch is unverified: here that is the point."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _cached_digest(settings: RegistrySettings, record: ModelRecord) -> Optional[str]:
    """The digest of the local artifact cache's entry for this record, None when it holds none."""
    from runners.artifacts import ArtifactStore

    if not record.sha256:
        return None
    artifact = ArtifactStore.complete_artifact(ArtifactStore(settings).entry_dir(record))
    return None if artifact is None else ArtifactStore.digest(artifact)


def check_entry(settings: RegistrySettings, record: ModelRecord, download: bool) -> dict[str, Any]:
    """One entry: its sha256 against the artifact's, from the local cache or a fresh download."""
    from runners.artifacts import ArtifactStore

    result: dict[str, Any] = {"model": record.name, "version": record.version, "sha256": record.sha256,
                              "location": record.location, "status": "", "where": None, "actual": None, "detail": ""}
    if not record.sha256:
        return {**result, "status": "no_digest", "detail": "no sha256 recorded: nothing to verify against"}
    cached = _cached_digest(settings, record)
    if cached == record.sha256:
        return {**result, "status": "ok", "where": "cache", "actual": cached}
    note = "" if cached is None else f"local cache entry differs ({cached[:12]}…); "
    if not download:
        return {**result, "status": "unreachable", "detail": note + "not in the local artifact cache (--no-download)"}
    with tempfile.TemporaryDirectory(prefix="registry-verify-") as tmp:
        store = ArtifactStore(settings.model_copy(update={"artifact_cache": Path(tmp)}))
        try:
            store.check_allowed(record)
        except ArtifactError as exc:
            return {**result, "status": "refused", "detail": note + exc.reason}
        try:
            with _quiet_logger("runners.artifacts"):
                local = store.fetch(dataclasses.replace(record, sha256=None))  # fetched as is; compared here
            actual = tree_sha256(local)
        except (ArtifactError, OSError, ValueError) as exc:
            return {**result, "status": "unreachable", "detail": note + str(getattr(exc, "reason", exc))}
    status = "ok" if actual == record.sha256 else "mismatch"
    detail = note + ("" if status == "ok" else f"the artifact's sha256 is {actual}")
    return {**result, "status": status, "where": "download", "actual": actual, "detail": detail}


def verify_backup(settings: RegistrySettings, names: list[str], download: bool) -> dict[str, Any]:
    path = Path(settings.backup_path)
    data: dict[str, Any] = {"ok": False, "path": str(path), "shape": None, "signature": None, "timestamp": None, "age_s": None,
                            "entries": [], "problems": []}
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise Problem(f"no backup file at {path}", path=str(path)) from None
    except OSError as exc:
        raise Problem(f"cannot read {path}: {exc}", path=str(path)) from exc
    where = f"backup file {path}"
    try:
        payload = RegistryPayload.parse(raw, where)
        data["shape"] = "ok"
    except PayloadError as exc:
        data["shape"] = str(exc)
        data["problems"].append(f"shape: {exc}")
        return data
    data["timestamp"] = payload.timestamp
    data["age_s"] = age_s(payload.written_at or os.path.getmtime(path))
    if settings.signing_key is not None:
        try:
            PayloadCodec.from_secret(settings.signing_key).decode(raw, where)
            data["signature"] = "ok"
        except SignatureError as exc:
            data["signature"] = str(exc)
            data["problems"].append(f"signature: {exc}")
    else:
        data["signature"] = "present, not checked (REGISTRY_SIGNING_KEY is not set)" if SIGNATURE_KEY in payload.raw else "unsigned"
    for name in names or payload.model_names():
        try:
            section = payload.section(name, source="file")
        except PayloadError as exc:
            data["entries"].append({"model": name, "version": None, "sha256": None, "status": "invalid", "detail": str(exc)})
            continue
        if section is None:
            data["problems"].append(f"{name}: the backup holds nothing for this model")
            continue
        unique = {(r.version, r.sha256, r.location): r for r in section.all_records()}
        for key in sorted(unique, key=lambda k: (int(k[0]), k[1] or "")):
            data["entries"].append(check_entry(settings, unique[key], download))
    data["problems"].extend(_entry_problem(e) for e in data["entries"] if e["status"] in PROBLEMS)
    data["ok"] = not data["problems"]
    return data


def _entry_problem(entry: dict[str, Any]) -> str:
    return f"{entry['model']} v{entry['version']}: {entry['status']}: {entry['detail']}"


def render(data: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    console.print(f"backup [bold]{esc(data['path'])}[/]: written {data['timestamp']} ({human_age(data['age_s'])} ago)")
    shape_ok, sig = data["shape"] == "ok", str(data["signature"])
    console.print("  shape: " + ("[green]ok[/]" if shape_ok else f"[red]{esc(data['shape'])}[/]"))
    if shape_ok:
        colour = "green" if sig == "ok" else "yellow" if sig.startswith(("unsigned", "present")) else "red"
        console.print(f"  signature: [{colour}]{esc(sig)}[/]")
    if data["entries"]:
        table = Table()
        for column in ("model", "version", "sha256", "status", "checked in", "detail"):
            table.add_column(column, overflow="fold")
        colours = {"ok": "green", "no_digest": "yellow"}
        for e in data["entries"]:
            status = f"[{colours.get(e['status'], 'red')}]{e['status']}[/]"
            table.add_row(e["model"], str(e["version"] or "?"), (e["sha256"] or "—")[:12], status, e.get("where") or "",
                          esc(e.get("detail") or ""))
        console.print(table)
    in_table = {_entry_problem(e) for e in data["entries"]}
    for p in data["problems"]:
        if p not in in_table:
            console.print(f"[red]✗ {esc(p)}[/]")
    console.print("[green]✓ the backup is usable[/]" if data["ok"] else f"[red]{len(data['problems'])} problem(s)[/]")


@backup.command("verify")
@click.option("--model", "models", multiple=True, metavar="NAME", help="only this model (repeatable)")
@click.option("--no-download", is_flag=True, help="check only the local artifact cache; never download")
@json_option
def verify(out: Output, models: tuple[str, ...], no_download: bool) -> None:
    """Check the backup's shape, signature and every entry's artifact digest; exit 1 on any problem."""
    settings = load_settings()
    names = check_names(models)
    with quiet_stdout():
        data = verify_backup(settings, names, download=not no_download)
    out.done(data, lambda console: render(data, console), OK if data["ok"] else UNHEALTHY)
