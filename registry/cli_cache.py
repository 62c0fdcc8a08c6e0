"""`registry cache show | refresh | clear`: the Redis copy of the registry payload."""

from __future__ import annotations

from typing import Any

import click
import redis

from registry.cli_common import OK, UNHEALTHY, Output, Problem, age_s, check_names, config_problem, esc, human_age, json_option, \
    load_settings, quiet_stdout
from registry.errors import PayloadError, SourceUnavailable
from registry.payload import RegistryPayload
from registry.settings import RegistrySettings
from registry.sources.base import section_summary
from registry.sources.redis_cache import RedisCacheSource


@click.group()
def cache() -> None:
    """The Redis cache of the registry payload (REGISTRY_REDIS_URL, REGISTRY_CACHE_KEY)."""


def _redis(settings: RegistrySettings) -> RedisCacheSource:
    source = RedisCacheSource.from_settings(settings)
    if source is None:
        raise config_problem("no Redis cache is configured (REGISTRY_REDIS_URL is not set)")
    return source


def _summary(payload: RegistryPayload, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names or payload.model_names():
        try:
            section = payload.section(name, source="redis")
        except PayloadError as exc:
            out[name] = {"present": True, "error": str(exc)}
            continue
        summary = section_summary(section)
        if section is not None:
            summary["aliases"] = {a: r.version for r in section.versions for a in r.aliases}
            summary["sha256"] = {r.version: r.sha256 for r in section.versions}
        out[name] = summary
    return out


@cache.command("show")
@click.option("--model", "models", multiple=True, metavar="NAME", help="only this model (repeatable)")
@json_option
def show(out: Output, models: tuple[str, ...]) -> None:
    """The cached payload, decoded: per model latest, best, versions and aliases; its TTL and age."""
    settings = load_settings()
    names = check_names(models)
    source = _redis(settings)
    try:
        try:
            payload = source.load_payload()
            ttl = source.client.ttl(source.key) if payload is not None else None
        except SourceUnavailable as exc:
            raise Problem(f"Redis unreachable: {exc.reason}", key=source.key) from exc
        except PayloadError as exc:
            raise Problem(f"the cached payload is unusable: {exc}", key=source.key) from exc
    finally:
        source.close()
    data: dict[str, Any] = {"ok": True, "key": source.key, "present": payload is not None}
    if payload is not None:
        data.update(ttl_s=ttl, timestamp=payload.timestamp, age_s=age_s(payload.written_at),
                    signed="signature" in payload.raw, models=_summary(payload, names))
    bad = [n for n, m in data.get("models", {}).items() if "error" in m]
    data["ok"] = not bad

    def render(console: Any) -> None:
        from rich.table import Table

        if payload is None:
            console.print(f"key [bold]{esc(source.key)}[/] is absent: the next resolution asks the layers below")
            return
        console.print(f"key [bold]{esc(source.key)}[/]: ttl {ttl}s, written {payload.timestamp} ({human_age(data['age_s'])} ago), "
                      f"{'signed' if data['signed'] else 'unsigned'}")
        table = Table()
        for column in ("model", "latest", "best", "versions", "aliases"):
            table.add_column(column)
        for name, m in data["models"].items():
            if "error" in m:
                table.add_row(name, "[red]?[/]", "[red]?[/]", "", f"[red]{esc(m['error'])}[/]")
            elif not m["present"]:
                table.add_row(name, "[dim]—[/]", "[dim]—[/]", "", "")
            else:
                aliases = ", ".join(f"{a}→{v}" for a, v in sorted(m["aliases"].items()))
                table.add_row(name, str(m["latest"]), str(m["best"] or "—"), ",".join(m["versions"]), aliases)
        console.print(table)

    out.done(data, render, UNHEALTHY if bad else OK)


@cache.command("refresh")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="model to refresh (repeatable; default REGISTRY_MODELS, else every model in MLflow)")
@json_option
def refresh(out: Output, models: tuple[str, ...]) -> None:
    """Rewrite the cache and the file backup from MLflow (deleted versions go), and tell the services."""
    from training.publisher import Publisher

    settings = load_settings()
    names = check_names(models) or list(settings.models)
    if not settings.mlflow_tracking_uri:
        raise config_problem("MLFLOW_TRACKING_URI is not set: there is no registry to refresh from")
    results: dict[str, Any] = {}
    with quiet_stdout():
        publisher = Publisher(settings)
        try:
            if not names:
                names = publisher.mlflow.payload().model_names()
            for name in names:
                record = publisher.refresh(name)
                results[name] = {"latest": record.version if record else None, "in_mlflow": record is not None,
                                 "announced": publisher.announce(name)}
        finally:
            publisher.close()
    data = {"ok": True, "models": results, "cache": settings.cache_key if settings.redis_url else None,
            "backup": str(settings.backup_path)}

    def render(console: Any) -> None:
        for name, r in results.items():
            what = f"latest {r['latest']}" if r["latest"] else "no version in MLflow (purged)"
            bus = f"announced (generation {r['announced']})" if r["announced"] is not None else "not announced (no shared bus)"
            console.print(f"[green]✓[/] {name}: cache and backup rewritten from MLflow, {what}; {bus}")
        if not results:
            console.print("no models to refresh")

    out.done(data, render)


@cache.command("clear")
@json_option
def clear(out: Output) -> None:
    """Delete the cached payload; the next resolution asks the layers below (and writes it back)."""
    settings = load_settings()
    source = _redis(settings)
    try:
        deleted = bool(source.client.delete(source.key))
    except redis.RedisError as exc:
        raise Problem(f"Redis unreachable: {type(exc).__name__}: {exc}", key=source.key) from exc
    finally:
        source.close()
    data = {"ok": True, "key": source.key, "deleted": deleted}
    out.done(data, lambda console: console.print(f"key [bold]{esc(source.key)}[/] " + ("deleted" if deleted else "was already absent")))


__all__ = ["cache"]
